"""Run by vLLM's own Python for `peftkit eval --engine vllm` (serve/vllm.py: generate_offline): answers to
token-id prompts from vLLM's offline engine, one JSON line each. Standard library and vllm only: peftkit is not
installed in vLLM's venv (`make vllm`).

    python vllm_worker.py REQUEST.json ANSWERS.jsonl
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    request = json.loads(open(sys.argv[1], encoding="utf-8").read())
    sampling = request["sampling"]
    llm = LLM(model=request["model"], seed=sampling.get("seed", 0), **request["engine"])
    params = SamplingParams(
        temperature=sampling["temperature"], top_p=sampling.get("top_p", 1.0), top_k=sampling.get("top_k", 0) or -1,
        repetition_penalty=sampling.get("repetition_penalty", 1.0), max_tokens=sampling["max_tokens"],
        stop_token_ids=request["stop_token_ids"], seed=sampling.get("seed", 0), detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params, use_tqdm=False)
    with open(sys.argv[2], "w", encoding="utf-8") as out:
        for index, output in enumerate(outputs):
            out.write(json.dumps({"index": index, "tokens": list(output.outputs[0].token_ids)}) + "\n")


if __name__ == "__main__":  # vLLM's CPU engine starts a process of its own: the guard keeps it from re-running this
    main()
