"""`--replicas 2`: two engine actors on the session's Ray cluster give what one engine in this process gives,
on the four local tasks (log-likelihoods, rolling perplexity and generation), request by request."""

from __future__ import annotations

from tests.platform.eval.conftest import evaluate
from tests.platform.eval.test_backend import assert_same_requests, assert_same_results


def test_two_ray_replicas_equal_one_engine(ray_local, tiny_model_dir, local_tm, neoxray_results):
    address = ray_local.get_runtime_context().gcs_address
    two = evaluate("neoxray", f"pretrained={tiny_model_dir},device=cpu,replicas=2,address={address}", local_tm)
    assert two["config"]["replicas"] == 2
    assert_same_results(two, neoxray_results)  # accuracies identical; perplexities amplify float noise
    assert_same_requests(two, neoxray_results, rtol=1e-6)  # batch composition moves the last float digits only
