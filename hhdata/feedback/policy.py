"""A policy the app samples replies from: a saved transformers model folder (a RUN_DIR).

Loaded with AutoTokenizer / AutoModelForCausalLM directly, so any run saved with
save_pretrained (the project's SFT and PPO runs, or a Hub model downloaded to a folder)
works. A reply is sampled from the HH transcript so far plus ``"\\n\\nAssistant:"``, and cut
where the model starts the next speaker's turn itself.
"""

from __future__ import annotations

import threading
from pathlib import Path

from hhdata.feedback.db import FeedbackError
from hhdata.pairs.transcript import ASSISTANT_TAG, HUMAN_TAG, render_transcript


class Policy:
    """A loaded model and tokenizer; `reply` is safe to call from many threads."""

    def __init__(self, model_id: str, tokenizer, model):
        self.model_id, self.tokenizer, self.model = model_id, tokenizer, model
        self._lock = threading.Lock()  # one generate at a time on this model

    def reply(self, so_far: list[dict[str, str]], **sampling) -> str:
        """Sample the assistant's next reply to the conversation so far, as text cut where
        the model starts the next turn (the arguments are `sample`'s)."""
        new_tokens = self.sample(so_far, **sampling)
        return cut_reply(self.tokenizer.decode(new_tokens, skip_special_tokens=True))

    def sample(
        self,
        so_far: list[dict[str, str]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        min_new_tokens: int = 0,
        stop: threading.Event | None = None,
    ) -> list[int]:
        """The new token ids sampled after the conversation so far and the Assistant tag.

        Setting `stop` ends the sampling after the current token (the annotator cancelled).
        With ``min_new_tokens`` the end token is suppressed until that many are sampled
        (transformers' min_new_tokens), so with min = max a reply has a known length: what
        a test of cancelling needs (a tiny random model often ends in a few tokens).
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                # shape: [batch]; one flag for every row
                cancelled = stop is not None and stop.is_set()
                return torch.full((input_ids.shape[0],), cancelled, dtype=torch.bool)

        prompt = render_transcript(so_far) + ASSISTANT_TAG
        encoded = self.tokenizer(prompt, return_tensors="pt")
        with self._lock, torch.inference_mode():
            output = self.model.generate(
                **encoded,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([Cancelled()]),
            )
        # shape: [1, prompt + new tokens]; keep the new tokens only
        return output[0, encoded["input_ids"].shape[1] :].tolist()


def cut_reply(text: str) -> str:
    """The reply up to where the model writes the next speaker's tag, without outer blanks.

    Carriage returns become newlines and NUL characters go: an HTML page shows them so
    (HTML parsing normalises both), and the annotator must judge the text that is stored.

    >>> cut_reply(" Sure.\\r\\nOK\\x00\\n\\nHuman: thanks")
    'Sure.\\nOK'
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    for tag in (HUMAN_TAG, ASSISTANT_TAG):
        text = text.split(tag, 1)[0]
    return text.strip()


def load_policy(run_dir: str | Path) -> Policy:
    """Load a saved policy; FeedbackError with a one-line reason when it cannot be."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FeedbackError(f"policy {run_dir} is not a folder; pass a saved run's folder")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    except ImportError as error:
        raise FeedbackError(
            f"loading a policy needs transformers and torch ({error}); "
            "pip install 'hhdata[train,feedback]'"
        ) from None
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise FeedbackError(
            f"cannot load the policy in {run_dir} ({first_line}); pass a folder saved with "
            "save_pretrained (config.json, weights and tokenizer)"
        ) from None
    model.eval()
    return Policy(path.resolve().name, tokenizer, model)
