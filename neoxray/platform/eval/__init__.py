"""`neoxray eval`: lm-evaluation-harness tasks on neoxray's own inference engine.

Importing this package registers the lm-eval backend `neoxray` (`neoxray.platform.eval.lm.NeoxrayLM`, imported
when lm-eval first asks for it), so that `lm_eval.simple_evaluate(model="neoxray", model_args="pretrained=DIR")`
finds it. Modules: `lm` (the backend), `runner` (one engine in this process), `replicas` (engines as Ray actors),
`tasks` (finding and loading tasks), `suites` (the GPT-NeoX-20B model card's tables), `results` (the results
JSON and tables), `run` (the `neoxray eval` driver).
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401 (lm-eval's own backends first: it imports them only into an empty registry)
from lm_eval.api.registry import model_registry

if "neoxray" not in model_registry:
    model_registry.register("neoxray", target="neoxray.platform.eval.lm:NeoxrayLM")
