"""A reward with real variance on a random tiny model's output, so GRPO tests have a gradient to follow."""


def text_length(prompts=None, completions=(), **kwargs) -> list[float]:
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(t) / 50 for t in texts]
