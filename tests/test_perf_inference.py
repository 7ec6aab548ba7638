"""Adapter switching on one warm base gives the same predictions as loading each adapter afresh."""

import sys
from pathlib import Path

import pytest
import torch

from app.core.settings import get_settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

TEXTS = ["a gripping , beautifully acted film .", "dull , lifeless and far too long ."]


@pytest.fixture
def adapters(tmp_path: Path) -> list[Path]:
    from perf_infer import make_adapters  # type: ignore[import-not-found]

    return list(make_adapters(tmp_path, 3))


def test_switching_adapters_matches_a_fresh_load(
    adapters: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from perf_infer import fresh_model  # type: ignore[import-not-found]

    from worker.inference import WarmModels

    monkeypatch.setenv("PEFT_STUDIO_INFERENCE_CACHE_SIZE", "2")
    get_settings.cache_clear()
    warm = WarmModels()
    try:
        # Twice round the adapters, so every switch after the first round goes back to an already-loaded one.
        for _ in range(2):
            for adapter_id, folder in enumerate(adapters, start=1):
                model, tokenizer, _ = warm.model_for(adapter_id, folder)
                batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
                with torch.inference_mode():
                    switched = model(**batch).logits
                    fresh = fresh_model(folder)(**batch).logits
                torch.testing.assert_close(switched, fresh, rtol=1e-5, atol=1e-5)
        assert warm.base_loads == 1  # one base model, every adapter switched onto it
        logits = []
        for adapter_id, folder in enumerate(adapters, start=1):
            model, tokenizer, _ = warm.model_for(adapter_id, folder)
            with torch.inference_mode():
                logits.append(model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits)
        assert not torch.allclose(logits[0], logits[1])  # the adapters really differ
    finally:
        get_settings.cache_clear()


def test_model_for_works_inside_and_outside_inference_mode(adapters: list[Path]) -> None:
    from worker.inference import WarmModels

    warm = WarmModels()
    with torch.inference_mode():
        warm.model_for(1, adapters[0])
    # Switching from outside inference mode used to fail on the inference tensors loaded inside it.
    model, _, studio = warm.model_for(2, adapters[1])
    assert studio["labels"] == ["0", "1"]
    assert model.active_adapter == "adapter_2"


def test_studio_json_is_reread_when_it_changes(adapters: list[Path]) -> None:
    import json
    import os

    from worker.inference import WarmModels

    warm = WarmModels()
    _, _, studio = warm.model_for(1, adapters[0])
    assert studio["max_length"] == 128
    path = adapters[0] / "studio.json"
    changed = {**json.loads(path.read_text()), "max_length": 64}
    path.write_text(json.dumps(changed))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    _, _, studio = warm.model_for(1, adapters[0])
    assert studio["max_length"] == 64
