"""Re-evaluate an exported artifact outside the search: does it score what its metrics.json claims?

    python bench/reevaluate.py ARTIFACT_DIR

The split (test histories and targets) comes from compression.data; everything after it is separate
code: the LiteRT interpreter called through both signatures as a device would (`score` for the full
row, `recommend` for the top-K), and HR@10 / NDCG@10 computed here, not by compression.metrics.
Prints one JSON line with the claimed and the re-computed figures.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from compression.data import load_dataset  # noqa: E402

K = 10


def _gain(rank: int | None) -> tuple[float, float]:
    """(hit, NDCG) of a target at 0-based `rank` (None: not in the top K)."""
    if rank is None or rank >= K:
        return 0.0, 0.0
    return 1.0, 1.0 / math.log2(rank + 2)


def reevaluate(artifact: Path) -> dict[str, Any]:
    meta = json.loads((artifact / "metrics.json").read_text())
    histories, targets = load_dataset().eval_histories("test", int(meta["window"]))
    interpreter = Interpreter(model_path=str(artifact / "model.tflite"))
    score = interpreter.get_signature_runner("score")
    recommend = interpreter.get_signature_runner("recommend")
    totals = np.zeros(4)  # hits and NDCG through `score`, then through `recommend`
    for history, target in zip(histories, targets, strict=True):
        batch = history[None, :].astype(np.int32)
        row = score(history=batch)["scores"][0].astype(np.float64)
        row[0] = -np.inf  # the padding index is never a recommendation
        better = int((row > row[target]).sum())  # ties counted in the target's favour
        top = [int(i) for i in recommend(history=batch)["item_ids"][0]]
        totals += (*_gain(better), *_gain(top.index(target) if target in top else None))
    n = len(targets)
    return {"artifact": str(artifact), "n": n, "claimed_hr10": meta["hr10"], "claimed_ndcg10": meta["ndcg10"],
            "score_hr10": totals[0] / n, "score_ndcg10": totals[1] / n,
            "recommend_hr10": totals[2] / n, "recommend_ndcg10": totals[3] / n}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps(reevaluate(Path(sys.argv[1]))))
