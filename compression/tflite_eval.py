"""Host-side evaluation and inspection of an exported ``.tflite`` (no TensorFlow needed).

Uses ``ai_edge_litert`` - the runtime devices use - so the figures in metrics.json and
golden.json are the exported model's own, not the Keras model's. Each call builds its own
interpreter: a tflite Interpreter is not thread-safe and holds no state worth sharing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from compression.metrics import RankingAccumulator

_LOGGER = logging.getLogger(__name__)

RECOMMEND = "recommend"
SCORE = "score"
INPUT_NAME = "history"

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def _runner(tflite_path: str | Path, signature: str, num_threads: int | None):
    interpreter = Interpreter(model_path=str(tflite_path), num_threads=num_threads)
    signatures = interpreter.get_signature_list()
    if signature not in signatures:
        raise KeyError(f"{tflite_path} has no signature {signature!r}; it has {sorted(signatures)}")
    return interpreter.get_signature_runner(signature)


def score_tflite(tflite_path: str | Path, histories: np.ndarray, num_threads: int | None = None):
    """Yield the ``score`` signature's full score row [V+1] for each history row."""
    run = _runner(tflite_path, SCORE, num_threads)
    for row in np.asarray(histories, dtype=np.int32):
        yield run(**{INPUT_NAME: row[None, :]})["scores"][0]


def evaluate_tflite(tflite_path: str | Path, histories: np.ndarray, targets: np.ndarray,
                    num_threads: int | None = None, chunk: int = 512) -> dict[str, float]:
    """Full-ranking HR@10/NDCG@10/MRR of a .tflite via its ``score`` signature."""
    acc: RankingAccumulator | None = None
    block: list[np.ndarray] = []
    targets = np.asarray(targets)
    done = 0
    for row in score_tflite(tflite_path, histories, num_threads):
        if acc is None:
            acc = RankingAccumulator(num_items=row.shape[0] - 1)
        block.append(row)
        if len(block) == chunk:
            acc.add(np.stack(block), targets[done:done + chunk])
            done += chunk
            block = []
    if acc is None:
        raise ValueError("no histories to evaluate")
    if block:
        acc.add(np.stack(block), targets[done:])
    return acc.result()


def recommend_tflite(tflite_path: str | Path, histories: np.ndarray,
                     num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run the ``recommend`` signature on each history: (item_ids int32 [N, K], scores float32 [N, K])."""
    run = _runner(tflite_path, RECOMMEND, num_threads)
    ids, scores = [], []
    for row in np.asarray(histories, dtype=np.int32):
        out = run(**{INPUT_NAME: row[None, :]})
        ids.append(out["item_ids"][0])
        scores.append(out["scores"][0])
    return np.stack(ids).astype(np.int32), np.stack(scores).astype(np.float32)


def tflite_ops(tflite_path: str | Path) -> list[list]:
    """Distinct ``[op_name, version]`` pairs the model needs; what a runtime must provide to load it."""
    model = schema.Model.GetRootAs(Path(tflite_path).read_bytes(), 0)
    ops = set()
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        # builtin codes above 127 only fit the newer field; older writers only fill the deprecated one
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = _OP_NAMES.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM" and code.CustomCode():
            name = f"CUSTOM:{code.CustomCode().decode()}"
        ops.add((name, int(code.Version())))
    return [list(op) for op in sorted(ops)]
