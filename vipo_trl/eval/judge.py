"""A pairwise judge: a vision-language model shown two images and asked which fits the prompt better, on a named
aspect, answering A or B. Each pair is asked twice, the second time with the images swapped; only verdicts that
survive the swap are kept (a judge that prefers whichever image comes first says nothing).

The answer is read from the model's next-token logits for "A" and "B" after the question (no sampling, no parsing of
free text), so a verdict is deterministic. Any `transformers` image-text-to-text model whose processor has a chat
template works; a Qwen2.5-VL-class model (e.g. `Qwen/Qwen2.5-VL-7B-Instruct`) is the intended judge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from .scorers import RewardScorer, register_scorer

#: The aspects the judge can be asked about, and the question each asks.
ASPECTS = {
    "overall": "Which image is better overall for this prompt: more faithful to it, and better looking?",
    "alignment": "Which image matches the prompt more faithfully (objects, counts, colours, positions, text)?",
    "aesthetics": "Which image is more aesthetically pleasing (composition, lighting, colour)?",
    "plausibility": "Which image is more plausible, with fewer artifacts and distortions?",
}


def order_consistent_verdict(first_says_a: bool, swapped_says_a: bool) -> int:
    """+1 when image 1 wins in both orders (A first, then B after the swap), -1 when image 2 wins in both, 0 when the
    answer follows the position instead of the image."""
    if first_says_a and not swapped_says_a:
        return 1
    if not first_says_a and swapped_says_a:
        return -1
    return 0


class PairwiseScorer(RewardScorer):
    """A scorer that compares two images for a prompt instead of scoring one: `compare(first, second, prompts)` gives
    +1 (first better), -1 (second better) or 0 (no verdict) per pair. `make_pairs` uses it to order candidate pairs."""

    def compare(
        self, first: Sequence[Image.Image], second: Sequence[Image.Image], prompts: Sequence[str]
    ) -> torch.Tensor:
        raise NotImplementedError

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        raise TypeError(f"{self.name} compares two images (compare(first, second, prompts)); it scores no single one.")


@register_scorer("vlm_judge")
class VLMJudge(PairwiseScorer):
    """Pairwise judge on a `transformers` vision-language model (`AutoModelForImageTextToText` + `AutoProcessor`).

    Args:
        model: hub id or folder of the judge (its processor must have a chat template).
        aspect: a key of `ASPECTS` or a question of your own.
        device, dtype, batch_size: as for every scorer.
    """

    def __init__(self, model: str = "Qwen/Qwen2.5-VL-7B-Instruct", aspect: str = "overall", **kwargs: Any):
        super().__init__(**kwargs)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model)
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"vlm_judge: the processor of {model!r} has no chat template; use an instruct model.")
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=self.dtype).to(self.device).eval()
        self.question = ASPECTS.get(aspect, aspect)
        tokenizer = self.processor.tokenizer
        self.answer_ids = [self._single_token(tokenizer, letter) for letter in ("A", "B")]

    @staticmethod
    def _single_token(tokenizer: Any, letter: str) -> int:
        ids = tokenizer.encode(letter, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"vlm_judge: the judge's tokenizer splits {letter!r} into {len(ids)} tokens.")
        return ids[0]

    def _messages(self, prompt: str) -> list[dict]:
        text = (
            f'Two images were generated for the prompt: "{prompt}". Image A is shown first, image B second. '
            f"{self.question} Answer with one letter: A or B."
        )
        return [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}],
            }
        ]

    @torch.no_grad()
    def prefers_first(self, first: Sequence[Image.Image], second: Sequence[Image.Image], prompts: Sequence[str]):
        """Per pair, whether the model answers "A" (the image shown first) rather than "B"."""
        answers = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(prompts)))
            texts = [
                self.processor.apply_chat_template(self._messages(prompts[i]), add_generation_prompt=True)
                for i in chunk
            ]
            images = [[first[i].convert("RGB"), second[i].convert("RGB")] for i in chunk]
            self.processor.tokenizer.padding_side = "left"  # the answer is read at the last position of every row
            inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True).to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            logits = self.model(**inputs).logits[:, -1].float()
            answers.append(logits[:, self.answer_ids[0]] > logits[:, self.answer_ids[1]])
        return torch.cat(answers).cpu() if answers else torch.zeros(0, dtype=torch.bool)

    def compare(
        self, first: Sequence[Image.Image], second: Sequence[Image.Image], prompts: Sequence[str]
    ) -> torch.Tensor:
        if not len(first) == len(second) == len(prompts):
            raise ValueError(f"{self.name}: got {len(first)} and {len(second)} images for {len(prompts)} prompts.")
        as_shown = self.prefers_first(first, second, prompts)
        swapped = self.prefers_first(second, first, prompts)
        return torch.tensor(
            [order_consistent_verdict(bool(a), bool(b)) for a, b in zip(as_shown, swapped)], dtype=torch.float32
        )
