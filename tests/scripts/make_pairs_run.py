"""A `make_pairs` build for the resume test: 4 prompts, 3 samples each, 1 prompt per shard, a programmatic scorer.
With --kill_after_images N the process SIGKILLs itself once N images have been scored (mid-shard, nothing cleans up).
With --rescore, `rescore_pairs` on 8 labelled pairs instead (2 per shard, relabelled by the same scorer). Prints the
number of images this process scored and its rank as its last line (JSON). Runs under `accelerate launch` too (each
process makes its share of the shards)."""

import argparse
import json
import os
import signal

import numpy as np
import torch

from vipo_trl.eval import RewardScorer, make_pairs, rescore_pairs
from vipo_trl.testing import png_bytes, sd_pipeline


class Redness(RewardScorer):
    def __init__(self, kill_after=None):
        super().__init__(device="cpu")
        self.scored, self.kill_after = 0, kill_after

    def _score_batch(self, images, prompts):
        self.scored += len(images)
        if self.kill_after is not None and self.scored >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        pixels = [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)) for im in images]
        return torch.stack([p[..., 0].mean() - p[..., 2].mean() for p in pixels])


parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--kill_after_images", type=int, default=None)
parser.add_argument("--rescore", action="store_true")
args = parser.parse_args()
scorer = Redness(args.kill_after_images)
scorer.name = "redness"
prompts = ["a red square", "a blue circle", "two cats", "a sign"]
if args.rescore:
    from datasets import Dataset

    colours = [(40 + 25 * k, 60, 200 - 20 * k) for k in range(9)]  # redder with k
    rows = [(f"pair {k}", png_bytes(colours[k]), png_bytes(colours[(k + 3) % 9])) for k in range(8)]
    data = Dataset.from_dict({key: list(values) for key, values in zip(("prompt", "chosen", "rejected"), zip(*rows))})
    rescore_pairs(data, [scorer], args.out, relabel=True, pairs_per_shard=2, progress=False)
else:  # one prompt per batch and per shard
    make_pairs(prompts, sd_pipeline(), [scorer], args.out, samples_per_prompt=3, num_inference_steps=2,
               prompts_per_shard=1, batch_size=3, progress=False)  # fmt: skip
print(json.dumps({"images_scored": scorer.scored, "rank": int(os.environ.get("RANK", "0"))}), flush=True)
