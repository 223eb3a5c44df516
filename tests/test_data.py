"""The Online Retail pipeline: quality.md's figures, raw == derived, leave-last-out windows."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from compression.data import (
    DERIVED_DIR,
    ITEMS_FILE,
    PADDING_DESCRIPTION,
    RAW_DIR,
    RAW_PARTS,
    SEQUENCES_FILE,
    DataError,
    Dataset,
    load_dataset,
    read_raw_sequences,
    write_derived,
)

RAW_PRESENT = all((RAW_DIR / p).is_file() for p in RAW_PARTS)
# The shipped copy is byte-reproducible: these change only if the derivation changes.
DERIVED_SHA256 = {
    ITEMS_FILE: "26002e0d07445958f32261852627cfc7db1887735f11cdd0c7d10a0b23753bfc",
    SEQUENCES_FILE: "4567052c9b8f58e94895d242d9cdfba86431c96cfd11c70b49fa9d6f89cbce36",
}


@pytest.fixture(scope="module")
def derived() -> Dataset:
    return load_dataset(str(DERIVED_DIR))


def test_derived_copy_has_quality_md_figures(derived: Dataset) -> None:
    assert (len(derived.customers), derived.num_items, derived.num_interactions) == (4105, 3659, 385788)
    assert derived.source.startswith("derived:")
    assert derived.split_summary() == {"customers": 4105, "items": 3659, "interactions": 385788,
                                       "test_users": 4105, "protocol": "leave-last-out"}


def test_shipped_derived_files_are_the_reproducible_ones() -> None:
    for name, digest in DERIVED_SHA256.items():
        assert hashlib.sha256((DERIVED_DIR / name).read_bytes()).hexdigest() == digest, name
    assert sum((DERIVED_DIR / n).stat().st_size for n in DERIVED_SHA256) < 3_000_000
    readme = (DERIVED_DIR / "README.md").read_text()
    assert "CC BY 4.0" in readme and "10.24432/C5BW33" in readme


def test_raw_csv_and_derived_copy_give_the_same_dataset(derived: Dataset, tmp_path) -> None:
    if not RAW_PRESENT:
        # No raw data on this machine: the shipped copy must still be the one derived from it.
        assert load_dataset().source.startswith("derived:")
        return
    sequences, descriptions = read_raw_sequences(RAW_DIR)
    written = write_derived(sequences, descriptions, tmp_path)
    for path in written:
        assert path.read_bytes() == (DERIVED_DIR / path.name).read_bytes(), path.name
    raw = load_dataset()  # default source prefers ../shared/data
    assert raw.source.startswith("raw:")
    assert raw.codes == derived.codes
    assert raw.descriptions == derived.descriptions
    assert raw.customers == derived.customers
    assert all(np.array_equal(a, b) for a, b in zip(raw.sequences, derived.sequences, strict=True))
    assert np.array_equal(raw.popularity, derived.popularity)


def test_vocabulary_and_descriptions(derived: Dataset) -> None:
    assert derived.codes[0] == "" and derived.descriptions[0] == PADDING_DESCRIPTION
    assert derived.codes[1:] == sorted(derived.codes[1:])
    assert all(c[:5].isdigit() and c == c.upper() for c in derived.codes[1:])
    assert all(d and d == d.strip() for d in derived.descriptions)
    assert derived.descriptions[derived.codes.index("85123A")] == "WHITE HANGING HEART T-LIGHT HOLDER"
    assert len(set(derived.codes)) == len(derived.codes)


def test_leave_last_out_histories(derived: Dataset) -> None:
    window = 20
    hist_test, tgt_test = derived.eval_histories("test", window)
    hist_val, tgt_val = derived.eval_histories("val", window)
    assert hist_test.shape == (4105, window) and hist_test.dtype == np.int32
    for u in (0, 17, 4104):
        seq = derived.sequences[u]
        assert tgt_test[u] == seq[-1] and tgt_val[u] == seq[-2]
        expected = seq[:-1][-window:]
        assert np.array_equal(hist_test[u][window - len(expected):], expected)
        assert not hist_test[u][: window - len(expected)].any()
        # the test history ends with the validation target: most recent last
        assert hist_test[u][-1] == seq[-2]
        assert hist_val[u][-1] == seq[-3]


def test_training_pairs_use_only_training_parts() -> None:
    data = load_dataset(str(DERIVED_DIR), max_customers=30)
    x, y = data.training_pairs(window=4)
    assert len(x) == sum(len(s) - 3 for s in data.sequences)  # each train part minus its first item
    first = data.sequences[0]
    assert x[0].tolist() == [0, 0, 0, first[0]] and y[0] == first[1]
    assert x[4].tolist() == first[1:5].tolist() and y[4] == first[5]
    # customer 1's first pair must not see customer 0's items
    start = len(first) - 3
    assert x[start].tolist() == [0, 0, 0, data.sequences[1][0]]
    assert (x[:, -1] > 0).all() and (y > 0).all()


def test_popularity_counts_training_parts_only() -> None:
    data = load_dataset(str(DERIVED_DIR), max_customers=40)
    counts = np.bincount(np.concatenate([s[:-2] for s in data.sequences]), minlength=data.num_items + 1)
    assert np.array_equal(data.popularity, counts)
    top = data.popular(5)
    assert data.popularity[top[0]] == counts[1:].max() and 0 not in top


def test_max_customers_slice_is_deterministic_and_reindexed(derived: Dataset) -> None:
    small = load_dataset(str(DERIVED_DIR), max_customers=25)
    assert small.customers == derived.customers[:25]
    assert small.num_items == len({c for s in small.sequences for c in s.tolist()})
    for u in range(25):
        small_codes = [small.codes[i] for i in small.sequences[u]]
        assert small_codes == [derived.codes[i] for i in derived.sequences[u]]


def test_bad_sources_and_arguments_name_the_problem(tmp_path) -> None:
    with pytest.raises(DataError, match=str(tmp_path)):
        load_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="max_customers must be >= 1"):
        load_dataset(str(DERIVED_DIR), max_customers=0)
    data = load_dataset(str(DERIVED_DIR), max_customers=3)
    with pytest.raises(ValueError, match="split must be one of"):
        data.eval_histories("train")
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        data.training_pairs(0)
    (tmp_path / SEQUENCES_FILE).write_bytes(b"")
    with pytest.raises(DataError, match=ITEMS_FILE):
        load_dataset(str(tmp_path))
