"""The lm-eval backend `neoxray` against lm-eval's own `hf` backend (transformers) on the same checkpoint: the
same metrics (accuracies and exact matches identical, perplexities within 1e-3 relative), the same per-request
log-likelihoods, greedy flags and generated texts, and the same left truncation of contexts longer than the
model's 64-token window. In process, no Ray."""

from __future__ import annotations

import math

import pytest

from tests.platform.eval.conftest import TASKS, at_root, evaluate

EXACT = ("acc", "acc_norm", "exact_match")
"""Metrics that must be identical; every other metric within RTOL."""
RTOL = 1e-3


def _close(a, b, rtol=RTOL) -> bool:
    return math.isclose(a, b, rel_tol=rtol) or (math.isinf(a) and a == b)


def assert_same_results(ours: dict, theirs: dict, rtol: float = RTOL) -> None:
    for task in TASKS:
        mine, ref = ours["results"][task], theirs["results"][task]
        assert mine.keys() == ref.keys(), task
        for key, value in ref.items():
            if key in ("alias", "name", "sample_len") or not isinstance(value, (int, float)):
                continue
            if key.partition(",")[0] in EXACT:
                assert mine[key] == value, f"{task} {key}: {mine[key]} != {value}"
            else:
                assert _close(mine[key], value, rtol), f"{task} {key}: {mine[key]} vs {value}"


def test_metrics_equal_the_hf_backend(neoxray_results, hf_results):
    assert_same_results(neoxray_results, hf_results)
    assert neoxray_results["n-samples"] == hf_results["n-samples"]
    assert neoxray_results["config"]["model_name"] == "tiny"  # the backend's model info is recorded


def assert_same_requests(ours: dict, theirs: dict, rtol: float = RTOL) -> dict:
    """Per request: log-likelihood within rtol and the same greedy flag; generated text identical. Returns how
    many of each kind were compared."""
    compared = {"loglikelihood": 0, "generate_until": 0, "loglikelihood_rolling": 0}
    for task in TASKS:
        for mine, ref in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            assert mine["arguments"] == ref["arguments"]
            for a, b in zip(mine["resps"], ref["resps"], strict=True):
                (a,), (b,) = a, b
                if isinstance(b, tuple):  # (log-likelihood, is_greedy)
                    assert _close(a[0], b[0], rtol) and a[1] == b[1], (task, a, b)
                    compared["loglikelihood"] += 1
                elif isinstance(b, str):
                    assert a == b, (task, mine["doc_id"])
                    compared["generate_until"] += 1
                else:
                    assert _close(a, b, rtol), (task, a, b)
                    compared["loglikelihood_rolling"] += 1
    return compared


def test_every_request_equals_the_hf_backend(neoxray_results, hf_results):
    """The same stop strings, end-of-text token and token budget: the same generated texts."""
    compared = assert_same_requests(neoxray_results, hf_results)
    assert min(compared.values()) >= 5, compared


@pytest.fixture(scope="module")
def backends(tiny_model_dir):
    """Both backends on the tiny model (64-token window), for token-level comparisons."""
    from lm_eval.models.huggingface import HFLM

    from neoxray.platform.eval.lm import NeoxrayLM

    ours = NeoxrayLM(pretrained=str(tiny_model_dir), device="cpu")
    theirs = HFLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=4)
    assert ours.max_length == theirs.max_length == 64
    return ours, theirs


def test_long_contexts_are_left_truncated_as_the_hf_backend_does(backends):
    """Windows of every length around the context (shorter, exactly the window, one more, far longer) score
    the same; the last window keeps the last 65 tokens, the last one only as a target."""
    ours, theirs = backends
    requests = []
    for total in (10, 63, 64, 65, 66, 200):
        for cont_len in (1, 5):
            ctx = [(7 * i + total) % 1000 + 2 for i in range(total - cont_len)]
            cont = [(11 * i + total) % 1000 + 2 for i in range(cont_len)]
            requests.append((None, ctx, cont))
    mine, ref = ours._loglikelihood_tokens(requests), theirs._loglikelihood_tokens(requests)
    for (_, ctx, cont), a, b in zip(requests, mine, ref):
        assert _close(a[0], b[0]) and a[1] == b[1], (len(ctx), len(cont), a, b)
    # truncation does change the answer: the first tokens of a long context are not seen
    cut = ours._loglikelihood_tokens([(None, [5] + requests[-1][1][1:], requests[-1][2])])
    assert cut[0][0] == pytest.approx(mine[-1][0], rel=1e-6)


def test_rolling_perplexity_windows_equal_the_hf_backend(backends):
    """A document of several windows (lm-eval's rolling windows with the end-of-text prefix)."""
    from lm_eval.api.instance import Instance

    ours, theirs = backends
    text = " ".join(f"word{i} and more text" for i in range(60))
    assert len(ours.tok_encode(text)) > 3 * ours.max_length
    req = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    assert _close(ours.loglikelihood_rolling(req, disable_tqdm=True)[0], theirs.loglikelihood_rolling(req)[0])


def test_generation_contexts_are_truncated_to_leave_room_for_new_tokens(backends):
    from lm_eval.api.instance import Instance

    ours, theirs = backends
    long_prompt = " ".join(f"item{i}" for i in range(80))
    reqs = [
        Instance("generate_until", {}, (long_prompt, {"until": ["\n\n"], "max_gen_toks": 12}), 0),
        Instance("generate_until", {}, ("Short", {"until": ["."], "max_gen_toks": 5, "do_sample": False}), 1),
    ]
    assert ours.generate_until(reqs, disable_tqdm=True) == theirs.generate_until(reqs)


def test_grouping_by_context_changes_no_result(tiny_model_dir, local_tm, neoxray_results):
    """Submitting longest-first instead of grouped by context gives the same answers."""
    other = evaluate("neoxray", f"pretrained={tiny_model_dir},device=cpu,group_by_context=false", local_tm)
    assert_same_results(other, neoxray_results)
    assert_same_requests(other, neoxray_results, rtol=1e-6)


def test_prefix_reuse_changes_no_result(tiny_model_dir, local_tm, neoxray_results):
    """The engine's prefix cache shares each multiple-choice context among its continuations: switched off,
    every answer is the same (and the shared run really took tokens from the cache)."""
    from neoxray.platform.eval.lm import NeoxrayLM

    other = evaluate("neoxray", f"pretrained={tiny_model_dir},device=cpu,prefix_caching=false", local_tm)
    assert_same_results(other, neoxray_results)
    assert_same_requests(other, neoxray_results, rtol=1e-6)
    lm = NeoxrayLM(pretrained=str(tiny_model_dir), device="cpu")
    try:
        context, choices = "The quick brown fox jumps over the lazy dog and runs into the woods", [" a", " b", " c"]
        lm.loglikelihood([_ll(context, c) for c in choices], disable_tqdm=True)
        assert lm._runner.engine.stats()["prefix_cache_tokens"] > 0  # the in-process engine
    finally:
        lm.close()


def test_a_model_split_over_two_workers_changes_no_result(tiny_model_dir, local_tm, neoxray_results):
    """`tensor_parallel_size=2`: the engine's model over two local worker processes (gloo), each with its shard;
    the same metrics and per-request log-likelihoods (within 1e-4) as the one-process engine."""
    other = evaluate("neoxray", f"pretrained={tiny_model_dir},device=cpu,tensor_parallel_size=2", local_tm)
    assert_same_results(other, neoxray_results)
    assert_same_requests(other, neoxray_results, rtol=1e-4)


def _ll(context: str, continuation: str):
    from lm_eval.api.instance import Instance

    return Instance("loglikelihood", {}, (context, continuation), 0)


def test_the_backend_is_registered_beside_lm_evals_own():
    from lm_eval.api.registry import get_model

    import neoxray.platform.eval  # noqa: F401 (importing the package registers the backend)
    from neoxray.platform.eval.lm import NeoxrayLM

    assert get_model("neoxray") is NeoxrayLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own backends stay reachable


def test_bad_backend_arguments_are_one_line_errors(tiny_model_dir):
    from neoxray.errors import NeoxrayError
    from neoxray.platform.eval.lm import NeoxrayLM

    with pytest.raises(NeoxrayError, match="batch_size must be an integer"):
        NeoxrayLM(pretrained=str(tiny_model_dir), batch_size="many")
    with pytest.raises(NeoxrayError, match="model not found"):
        NeoxrayLM(pretrained=str(tiny_model_dir / "missing"))


def test_a_generation_budget_beyond_the_context_is_refused(backends):
    from lm_eval.api.instance import Instance

    from neoxray.errors import NeoxrayError

    ours, _ = backends
    with pytest.raises(NeoxrayError, match="must be less than the model's context"):
        ours.generate_until([Instance("generate_until", {}, ("Hi", {"until": ["."]}), 0)], disable_tqdm=True)


def test_local_tasks_need_no_network(local_tm):
    """The local tasks load with the hub unreachable (offline mode), from the repository root."""
    with at_root():
        loaded = local_tm.load(TASKS)
    assert sorted(loaded["tasks"]) == sorted(TASKS)
