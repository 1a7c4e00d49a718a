"""Held-out tool-calling prompts from the glaive demo: the last 50 records, each cut after its first call.

The tool-calling example (examples/toolcall_lora.yaml) trains on the first 250 records of
data/demo/glaive_toolcall_en_demo.json; each of the last 50 becomes one eval record ending at its first
`function_call` turn (the call is the reference) or, when it calls nothing, at its first answer (the
model should answer in words). Run from the repository root; writes data/demo/glaive_toolcall_heldout.json.
"""

from __future__ import annotations

import json
from pathlib import Path

SOURCE = Path("data/demo/glaive_toolcall_en_demo.json")
TARGET = Path("data/demo/glaive_toolcall_heldout.json")
TRAIN = 250


def heldout(records: list[dict]) -> list[dict]:
    out = []
    for record in records[TRAIN:]:
        turns = record["conversations"]
        roles = [t["from"] for t in turns]
        end = roles.index("function_call") if "function_call" in roles else roles.index("gpt")
        out.append({**record, "conversations": turns[: end + 1]})
    return out


def main() -> None:
    records = heldout(json.loads(SOURCE.read_text(encoding="utf-8")))
    TARGET.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    calls = sum(r["conversations"][-1]["from"] == "function_call" for r in records)
    print(f"{TARGET}: {len(records)} records, {calls} ending in a tool call")


if __name__ == "__main__":
    main()
