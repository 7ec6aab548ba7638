"""What the OpenAI-compatible layer's parts share: id prefixes, the organisation, timestamps, id parsing."""

import re
from datetime import UTC, datetime

from app.core.errors import NotFound

FILE_PREFIX = "file-"
JOB_PREFIX = "ftjob-"
ORGANIZATION = "peft-studio"
# A fine-tuned model's name ends with its job: ft:<base>[:<suffix>]:ftjob-<n>.
FT_NAME = re.compile(r"(?:^|:)ftjob-(\d+)$")


def unix(moment: datetime | None) -> int | None:
    """A timestamp as OpenAI writes it: whole seconds since the epoch."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def id_number(prefix: str, value: str, field: str, what: str) -> int:
    """The ``n`` of an id ``<prefix><n>``; NotFound naming the parameter when it is not one."""
    if value.startswith(prefix) and value[len(prefix) :].isascii() and value[len(prefix) :].isdigit():
        return int(value[len(prefix) :])
    raise NotFound(f"No such {what}: {value!r} (ids look like {prefix}1).", field=field)
