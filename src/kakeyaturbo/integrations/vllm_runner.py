"""One vLLM engine process, for tests and benchmarks: ``python -m kakeyaturbo.integrations.vllm_runner SPEC OUT``.

``SPEC`` (JSON): ``model`` (folder), ``prompts`` (each a list of token ids, or ``{"ids": [...],
"prompt_logprobs": k}`` for one whose prompt log-probabilities are wanted), ``max_tokens``,
``logprobs``, ``dtype``, ``max_model_len`` and, for a run with a KV connector, ``connector``
(:mod:`kakeyaturbo.integrations.vllm`'s ``kv_connector_extra_config``) or ``example_store`` (a folder
for vLLM's own ``ExampleConnector``, which stores each layer's K/V as safetensors in the model's
dtype). vLLM's own prefix cache is off, so every token is either computed or loaded by the connector.
``OUT`` (JSON): per prompt the new tokens, the top ``logprobs`` of each step, the top
``prompt_logprobs`` of each prompt position (with the prompt's own token; None for the first one and
for every position predicted from a token a connector loaded), vLLM's cached-token count and the seconds
its request took (requests run one at a time, so that is its time to the last token); the engine's
start-up seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
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
    elif spec.get("example_store") is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="ExampleConnector", kv_role="kv_both",
            kv_connector_extra_config={"shared_storage_path": spec["example_store"]})
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "bfloat16"), enforce_eager=True,
              max_model_len=spec.get("max_model_len", 4096), kv_cache_memory_bytes=spec.get("kv_bytes", 512 << 20),
              enable_prefix_caching=False, seed=0, **kwargs)
    started = time.perf_counter() - t0
    results = []
    try:
        for prompt in spec["prompts"]:
            ids, top = (prompt["ids"], prompt["prompt_logprobs"]) if isinstance(prompt, dict) else (prompt, None)
            params = SamplingParams(max_tokens=spec.get("max_tokens", 16), temperature=0.0,
                                    logprobs=spec.get("logprobs", 5), prompt_logprobs=top,
                                    skip_reading_prefix_cache=False, detokenize=False)
            t1 = time.perf_counter()
            out = llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)[0]
            seconds = time.perf_counter() - t1
            steps = out.outputs[0].logprobs or []
            results.append({"tokens": list(out.outputs[0].token_ids), "cached": int(out.num_cached_tokens or 0),
                            "seconds": seconds, "logprobs": [_top(step) for step in steps],
                            # position j is predicted from token j - 1's hidden state, which vLLM never computes
                            # for a loaded token (its row is left empty)
                            "prompt_logprobs": [None if j <= int(out.num_cached_tokens or 0) else _top(step)
                                                for j, step in enumerate(out.prompt_logprobs or [])]})
    finally:
        llm.llm_engine.engine_core.shutdown()  # engine core and workers gone before this process leaves
    return {"start_s": started, "results": results}


def run_in_process(spec: dict[str, Any], workdir: Path, name: str, timeout: float = 1800) -> dict[str, Any]:
    """Run ``spec`` in a new engine process (this interpreter), files ``workdir/name.{spec,out}.json``;
    its output (:func:`run`). Raises ``RuntimeError`` with the process' last stderr if it fails."""
    spec_file, out_file = workdir / f"{name}.spec.json", workdir / f"{name}.out.json"
    spec_file.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "kakeyaturbo.integrations.vllm_runner", str(spec_file),
                           str(out_file)], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"vLLM engine {name!r} failed:\n{done.stderr[-4000:]}")
    return json.loads(out_file.read_text())


def _top(step: Any) -> dict[str, float] | None:
    """``{token id: logprob}`` of one position's logprobs (None stays None)."""
    return None if step is None else {str(t): float(p.logprob) for t, p in step.items()}


def main(argv: list[str] | None = None) -> int:
    """Read ``SPEC``, run, write ``OUT``."""
    spec_path, out_path = (argv if argv is not None else sys.argv[1:])[:2]
    out = run(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # After a clean engine shutdown, vLLM's C++ runtime can abort while the interpreter tears down
    # ("terminate called without an active exception", SIGABRT), at random, once the results are
    # written; leaving without that teardown keeps a finished run's exit status 0. Errors raised above
    # still exit non-zero with their traceback.
    os._exit(code)
