"""One tool-calling round trip through `peftkit serve` with the official openai client, as an agent runs it.

Takes a held-out glaive record (data/demo/glaive_toolcall_en_demo.json, index >= 250: never trained on),
asks its question with its tools (tool_choice auto), prints the tool_calls the model makes, sends the
record's own tool result back as a `tool` message and prints the final answer.

    peftkit serve --config examples/toolcall_lora.yaml --adapter outputs/toolcall_lora --port 8000 &
    python benchmarks/toolcall_exchange.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import openai

DATA = Path(__file__).resolve().parents[1] / "data/demo/glaive_toolcall_en_demo.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="toolcall_lora")
    parser.add_argument("--record", type=int, default=None, help="default: the first held-out record that calls a tool")
    args = parser.parse_args()
    records = json.loads(DATA.read_text(encoding="utf-8"))
    calling = [i for i, r in enumerate(records) if i >= 250 and any(t["from"] == "function_call" for t in r["conversations"])]
    if args.record is not None and args.record not in calling:
        parser.error(f"record {args.record} is not a held-out record that calls a tool; these are: {calling}")
    turns = records[calling[0] if args.record is None else args.record]["conversations"]
    record = records[calling[0] if args.record is None else args.record]
    first_call = next(i for i, t in enumerate(turns) if t["from"] == "function_call")
    messages: list[dict] = [{"role": "user", "content": turns[first_call - 1]["value"]}]
    tools = [{"type": "function", "function": f} for f in json.loads(record["tools"])]
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")
    print("user:", messages[0]["content"])
    reply = client.chat.completions.create(model=args.model, messages=messages, tools=tools, temperature=0,
                                           max_tokens=128).choices[0]
    print("finish_reason:", reply.finish_reason)
    print("tool_calls:", [(c.function.name, c.function.arguments) for c in reply.message.tool_calls or []])
    print("reference call:", turns[first_call]["value"])
    if not reply.message.tool_calls:
        print("content:", reply.message.content)
        return
    messages.append(reply.message.model_dump(exclude_none=True))
    for call in reply.message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": turns[first_call + 1]["value"]})
    print("tool result:", turns[first_call + 1]["value"])
    final = client.chat.completions.create(model=args.model, messages=messages, tools=tools, temperature=0,
                                           max_tokens=128).choices[0]
    print("assistant:", final.message.content, f"(finish_reason {final.finish_reason})")


if __name__ == "__main__":
    main()
