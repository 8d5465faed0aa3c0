"""What a task means to the trainer: its data, the keys of its batches, its loss, what its
eval step returns per example and the predictions and metrics made of it. The trainer asks the
task of the model's registry entry (``ModelEntry.task``) and never branches on which it is; a
new task is a new module here and a config.

    task = tasks.for_entry(models.get(config.model.name))
    spec = task.data_spec(config, entry)
    sources = task.sources(config, entry, spec)
"""
from surm.tasks.base import Sources, Task
from surm.tasks.causal_lm import CausalLM
from surm.tasks.classification import Classification, preprocessors

TASKS: dict[str, Task] = {"classification": Classification(), "causal_lm": CausalLM()}


def for_entry(entry) -> Task:
    """The task of a model's registry entry (``entry.task``; classification when it does not
    say)."""
    name = getattr(entry, "task", "classification")
    if name not in TASKS:
        raise ValueError(f"model {entry.name!r} declares task {name!r}; known: "
                         f"{', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "CausalLM", "Classification", "Sources", "Task", "for_entry",
           "preprocessors"]
