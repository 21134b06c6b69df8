"""The perplexity protocol: window alignment, float64 log-softmax, the eval text. No model needed."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from gemma3.runtime.perplexity import (
    eval_ids,
    eval_text,
    eval_windows,
    evaluate,
    nll,
    perplexity,
    window_nll,
)

BOS = 2
# bos + 12 distinct fake ids, so every slice is recognisable: 100, 101, ..., 111
IDS = [BOS, *range(100, 112)]


# --- windows ----------------------------------------------------------------------------------------------


def test_windows_layout_small():
    windows = eval_windows(IDS, bos_id=BOS, window=4, targets=12)
    assert windows == [
        ([BOS, 100, 101, 102], [100, 101, 102, 103]),  # window 0: ids[0:4] -> ids[1:5], starts with the real bos
        ([BOS, 103, 104, 105, 106], [104, 105, 106, 107]),  # [bos] + ids[4:8] -> ids[5:9]
        ([BOS, 107, 108, 109, 110], [108, 109, 110, 111]),  # [bos] + ids[8:12] -> ids[9:13]
    ]


def test_windows_cover_every_target_once_with_its_true_predecessor():
    windows = eval_windows(IDS, bos_id=BOS, window=4, targets=12)
    scored = [t for _, targets in windows for t in targets]
    assert scored == IDS[1:13]  # each of the 12 targets exactly once, in order
    for inputs, targets in windows:
        # The last len(targets) positions predict the targets: position j predicts the token after inputs[j].
        predictors = inputs[-len(targets) :]
        for pred, tgt in zip(predictors, targets):
            assert IDS[IDS.index(pred) + 1] == tgt
        # Windows after the first drop exactly one position: the prediction made at the inserted bos.
        assert len(inputs) - len(targets) in (0, 1)


def test_windows_protocol_sizes():
    ids = [BOS, *range(10, 10 + 5000)]
    windows = eval_windows(ids)
    assert [len(i) for i, _ in windows] == [1024, 1025, 1025, 1025]
    assert [len(t) for _, t in windows] == [1024] * 4
    assert windows[1][0][:2] == [BOS, ids[1024]] and windows[1][1][0] == ids[1025]
    assert windows[3][1][-1] == ids[4096]  # the 4097th id is the last target; ids past it are unused


@pytest.mark.parametrize(
    "ids, kwargs, match",
    [
        (IDS[:12], {"window": 4, "targets": 12}, "need 13 ids"),
        (IDS, {"window": 5, "targets": 12}, "multiple"),
        (IDS[1:] + [1], {"window": 4, "targets": 12}, "start with bos"),
    ],
)
def test_windows_reject_bad_input(ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        eval_windows(ids, bos_id=BOS, **kwargs)


def test_eval_ids_prepends_bos_and_cuts():
    ids = eval_ids(lambda text: list(range(10, 10 + len(text))), bos_id=BOS, targets=8)
    assert ids == [BOS, *range(10, 18)]
    with pytest.raises(ValueError, match="its own bos"):
        eval_ids(lambda text: [BOS, 5, 6, 7], bos_id=BOS, targets=2)


# --- log-softmax in float64 -------------------------------------------------------------------------------


def test_nll_matches_hand_computation():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    targets = [0, 2]
    # -log softmax: row 0 target 0 = log(e + e^2 + e^3) - 1; row 1 uniform = log 3
    expected = (math.log(math.e + math.e**2 + math.e**3) - 1.0) + math.log(3.0)
    assert nll(logits, targets) == pytest.approx(expected, rel=1e-12)
    assert perplexity(expected, 2) == pytest.approx(math.exp(expected / 2), rel=1e-12)


def test_nll_is_float64_and_stable():
    # A 1e-3 gap at magnitude 1e4 sits at float32's resolution; in float64 it is exact to ~1e-12.
    logits = np.array([[1.0e4, 1.0e4 - 1e-3]], dtype=np.float64)
    expected = math.log1p(math.exp(-1e-3))  # -log softmax of the larger one
    assert nll(logits, [0]) == pytest.approx(expected, rel=1e-9)
    # Huge logits do not overflow.
    assert math.isfinite(nll(np.array([[1e30, 0.0]]), [1]))


def test_nll_chunks_agree_with_one_shot():
    # float32 inputs, more rows than one chunk; agreement to 1e-12 holds only if the sums run in float64.
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((300, 50)).astype(np.float32) * 4
    targets = rng.integers(0, 50, 300)
    ref = logits.astype(np.float64)
    ref = ref - ref.max(-1, keepdims=True)
    ref = -(ref - np.log(np.exp(ref).sum(-1, keepdims=True)))[np.arange(300), targets].sum()
    assert nll(logits, targets) == pytest.approx(ref, rel=1e-12)


def test_window_nll_scores_the_last_positions():
    vocab = 200
    windows = eval_windows(IDS, bos_id=BOS, window=4, targets=12)

    def oracle(inputs: list[int]) -> np.ndarray:
        """Logits that put all mass on the true next token, except at a re-inserted bos (garbage)."""
        out = np.zeros((1, len(inputs), vocab), dtype=np.float32)
        for j, tok in enumerate(inputs):
            if j == 0 and len(inputs) == 5:
                out[0, j, 0] = 1e4  # the prediction at the inserted bos: must be ignored
            else:
                out[0, j, IDS[IDS.index(tok) + 1]] = 1e4
        return out

    total, count = evaluate(windows, oracle)
    assert count == 12
    assert total == pytest.approx(0.0, abs=1e-6)
    assert perplexity(total, count) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one row per target"):
        nll(np.zeros((3, vocab)), [1, 2])
    assert window_nll(np.zeros((5, vocab)), [1, 2, 3, 4]) == pytest.approx(4 * math.log(vocab))


# --- the text ---------------------------------------------------------------------------------------------


def test_eval_text_is_the_pydoc_topics():
    from pydoc_data import topics

    # The topics differ between Python versions (79 on 3.11): check the construction, not a count.
    names = sorted(topics.topics)
    text = eval_text()
    assert len(names) > 1 and all(isinstance(topics.topics[k], str) for k in names)
    assert text == "\n\n".join(topics.topics[k] for k in names)  # sorted by name, blank lines between
    assert text.startswith(topics.topics[names[0]]) and text.endswith(topics.topics[names[-1]])
    assert text.count("\n\n") >= len(names) - 1
    assert len(text) > 100_000  # far more than the protocol's 4097 ids need, on any Python (465K chars on 3.11)


def test_perplexity_module_does_not_import_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['transformers'] = None\n"
        "import gemma3.runtime.perplexity as p\n"
        "assert len(p.eval_windows([2] + list(range(4096)))) == 4\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
