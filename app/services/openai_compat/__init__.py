"""The OpenAI-compatible API mapped onto the studio's own objects.

- A **file** (``file-<n>``) is dataset ``n``. ``POST /v1/files`` (purpose ``fine-tune``) takes JSONL in OpenAI's
  chat form (``{"messages": [...]}``) or prompt/completion form and stores it through the normal dataset
  upload (validation, profile, artifact store); every dataset can be used as a file.
- A **fine-tuning job** (``ftjob-<n>``) is job ``n``: a ``causal-lm`` job whose data format follows from the
  file's columns. What OpenAI's request carries beyond our spec (the model as named, suffix, metadata, the
  hyperparameters as asked) is kept in ``finetuningjoblink``. Our method and its settings come from the
  ``peft`` extension field (``extra_body={"peft": {...}}`` with the official client) or from metadata keys
  ``peft.method`` / ``peft.config`` (JSON text).
- A **fine-tuned model** is a finished job's adapter, named ``ft:<base>:<suffix>:ftjob-<n>`` (``<base>`` is the
  model as named, or a local folder's own name; without a suffix ``ft:<base>:ftjob-<n>``). Requests find the
  adapter by the trailing job id.

The layer's parts: ``files`` (uploads), ``fine_tuning`` (jobs) and ``progress`` (their events and checkpoints),
``models`` (listing, and which adapter a model name means), ``completions`` (the chat and completion request
shapes), ``errors`` (error shaping); the routes are app/api/openai_compat.py, and generation runs through
app/services/generation.py.
"""

from app.services.openai_compat.fine_tuning import fine_tuned_model_name

__all__ = ["fine_tuned_model_name"]  # app/web/causal_pages.py names the fine-tuned model on the adapter page
