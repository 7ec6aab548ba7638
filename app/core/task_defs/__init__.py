"""One module per task, each defining ``TASK = TaskInfo(...)`` (see ``app/core/tasks.py``); discovered by name."""
