"""The dataset page's preview (issue 19): a chat column reads as a conversation, not as Python reprs."""

import json
from typing import Any


def test_a_chat_dataset_previews_as_messages(client: Any) -> None:
    # given: a chat dataset (a messages column of role/content turns)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Isn't {i} odd?"},
                {"role": "assistant", "content": "It's fine."},
            ]
        }
        for i in range(5)
    ]
    data = "\n".join(json.dumps(row) for row in rows).encode()
    dataset = client.post("/api/v1/datasets", files={"file": ("chat.jsonl", data)}).json()
    # when
    page = client.get(f"/datasets/{dataset['id']}", headers={"Accept": "text/html"}).text
    # then: messages are chat turns with their text, no Python dict reprs, inside the bounded preview
    assert 'data-testid="chat-preview"' in page
    assert "{&#39;role&#39;" not in page and "{'role'" not in page
    assert 'class="chat-turn chat-user"' in page and "Isn&#39;t 0 odd?" in page
    assert "preview-scroll" in page
