"""One vLLM engine process, for tests and benchmarks: ``python -m kakeyaturbo.integrations.vllm_runner SPEC OUT``.

``SPEC`` (JSON): ``model`` (folder), ``prompts`` (lists of token ids), ``max_tokens``, ``logprobs``,
``dtype``, ``max_model_len`` and, for a run with the connector, ``connector``
(:mod:`kakeyaturbo.integrations.vllm`'s ``kv_connector_extra_config``). vLLM's own prefix cache is off,
so every token is either computed or loaded by the connector. ``OUT`` (JSON): per prompt the new
tokens, the top ``logprobs`` of each step, vLLM's cached-token count and the seconds its request took
(requests run one at a time, so that is its time to the last token); the engine's start-up seconds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Start an engine as ``spec`` says, run its prompts one by one and return what came out."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kwargs: dict[str, Any] = {}
    if spec.get("connector") is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KakeyaConnector", kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_module_path="kakeyaturbo.integrations.vllm", kv_connector_extra_config=spec["connector"])
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "bfloat16"), enforce_eager=True,
              max_model_len=spec.get("max_model_len", 4096), kv_cache_memory_bytes=spec.get("kv_bytes", 512 << 20),
              enable_prefix_caching=False, seed=0, **kwargs)
    started = time.perf_counter() - t0
    params = SamplingParams(max_tokens=spec.get("max_tokens", 16), temperature=0.0, logprobs=spec.get("logprobs", 5))
    results = []
    for ids in spec["prompts"]:
        t1 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)[0]
        seconds = time.perf_counter() - t1
        steps = out.outputs[0].logprobs or []
        results.append({"tokens": list(out.outputs[0].token_ids), "cached": int(out.num_cached_tokens or 0),
                        "seconds": seconds,
                        "logprobs": [{str(t): float(p.logprob) for t, p in step.items()} for step in steps]})
    return {"start_s": started, "results": results}


def main(argv: list[str] | None = None) -> int:
    """Read ``SPEC``, run, write ``OUT``."""
    spec_path, out_path = (argv if argv is not None else sys.argv[1:])[:2]
    out = run(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
