"""9. Seed-faithfulness filter: how well each deterministic signal of
`unicorn_assets.logic.faithfulness` separates a caption scored against its own seed (a positive)
from the same caption scored against another image's seed (a negative), as ROC-AUC, and the share
of each the Stage 1 filter rejects at the thresholds of `quality_gates`.

The captions are real: Stage 1 prompts, styles and sampling seeds on held-out COCO captions (one
per image, far past the images the tests and other benchmarks use), written by the offline model
through the project's llama_cpp backend. Completions go through the response cache in
benchmarks/_work/, so a rerun scores the same texts without generating again.
"""

from __future__ import annotations

import re
import time
from typing import Any

from benchmarks.common import WORK, Row, coco_captions
from unicorn_assets.expansion import ExpansionConfig, faithfulness_rules
from unicorn_assets.logic import faithfulness
from unicorn_assets.logic.expansion import clean_completion, plan_expansions
from unicorn_assets.logic.prompts import load_prompt_set
from unicorn_resources.llm import ChatRequest, LlamaCppLLM
from unicorn_resources.quality_gates import QualityGates

FULL = {"seeds": 60, "offset": 2000}
SMOKE = {"seeds": 4, "offset": 2000, "max_tokens": 8}
BENCH = "9. Seed-faithfulness filter"
CACHE = WORK / "faithfulness_llm_cache.sqlite"  # git-ignored; a rerun generates nothing


def seeds(size: dict[str, Any]) -> list[dict[str, Any]]:
    """Held-out seeds: one caption per image, `offset` images into the dev file."""
    return coco_captions(size["seeds"], offset=size["offset"], one_per_image=True)


def expansions(llm: Any, size: dict[str, Any]) -> dict[str, Any]:
    """Stage 1's requests for the held-out seeds (one expansion per seed), answered by `llm`."""
    import polars as pl

    records = seeds(size)
    config = ExpansionConfig(expansions_per_seed=1)
    if "max_tokens" in size:
        config = config.model_copy(update={"max_tokens": size["max_tokens"]})
    prompts = load_prompt_set(config.prompt, config.prompt_version)
    frame = pl.DataFrame({"seed_id": [r["id"] for r in records],
                          "shard": ["bench"] * len(records),
                          "caption": [r["caption"] for r in records]})
    plan = plan_expansions(frame, prompts, config.styles, 1, config.sampling_seed)
    requests = [ChatRequest.of(prompts.messages(style, caption=caption), seed=seed)
                for style, caption, seed in plan.select("style", "seed_caption",
                                                         "sampling_seed").iter_rows()]
    params = config.sampling()
    started = time.perf_counter()
    completions = llm.generate(requests, params)
    seconds = time.perf_counter() - started
    return {
        "seeds": plan["seed_caption"].to_list(),
        "captions": [clean_completion(c.text, c.finish_reason) for c in completions],
        "completions": completions, "seconds": seconds, "max_tokens": params.max_tokens,
        "plan": plan,
    }


def roc_auc(positives: list[float], negatives: list[float]) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U)."""
    if not positives or not negatives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def perturbed(seed: str, signal: str) -> str | None:
    """The seed with one fact changed, as a contradicting caption would change it: its first count
    (two -> three), its first colour (to another family) or its first object of an exclusive class
    (zebra -> the next animal of the list). None when the seed has no such word."""
    toks = re.findall(r"[A-Za-z]+|\d+|[^A-Za-z\d]+", seed)
    for i, tok in enumerate(toks):
        low = tok.lower()
        new = None
        ordinal = low.isdigit() and i + 1 < len(toks) and toks[i + 1][:1].isalpha()  # 5th
        if signal == "count_conflicts" and (low in _NUMBERS[1:] or (low.isdigit() and not ordinal)):
            new = str(int(low) + 1) if low.isdigit() else _NUMBERS[(_NUMBERS.index(low) + 1) % 10]
        elif signal == "colour_conflicts" and low in faithfulness.COLOUR_FAMILY:
            new = "blue" if faithfulness.COLOUR_FAMILY[low] != "blue" else "red"
        elif signal == "object_conflicts":
            lem = faithfulness.lemma(low)
            for members in faithfulness.EXCLUSIVE_CLASSES.values():
                if lem in members and lem not in ("man", "woman", "boy", "girl"):
                    ordered = sorted(members)
                    new = ordered[(ordered.index(lem) + 1) % len(ordered)]
                    break
        if new is not None:
            return "".join(toks[:i] + [new] + toks[i + 1:])
    return None


def contradiction_auc(seed_texts: list[str], captions: list[str]) -> dict[str, dict[str, float]]:
    """Each conflict signal on the captions whose seed has a fact of its kind: the caption against
    its own seed (positive) and against that seed with the fact changed (negative)."""
    out = {}
    for name in ("count_conflicts", "colour_conflicts", "object_conflicts"):
        pos, neg = [], []
        for seed, caption in zip(seed_texts, captions):
            changed = perturbed(seed, name)
            if changed is not None:
                pos.append(-getattr(faithfulness.score(seed, caption), name))
                neg.append(-getattr(faithfulness.score(changed, caption), name))
        caught = sum(1 for p, q in zip(pos, neg) if q < p)
        out[name] = {"auc": roc_auc(pos, neg), "n": len(pos),
                     "caught": caught / len(pos) if pos else float("nan"),
                     "false_alarm_on_own_seed": sum(p < 0 for p in pos) / len(pos) if pos
                     else float("nan")}
    return out


def score_pairs(seed_texts: list[str], captions: list[str], rules: Any) -> dict[str, Any]:
    """Each caption against its own seed and against the seed of the image half the list away."""
    n = len(captions)
    shift = max(1, n // 2)
    own = [faithfulness.score(s, c) for s, c in zip(seed_texts, captions)]
    other = [faithfulness.score(seed_texts[(i + shift) % n], c) for i, c in enumerate(captions)]
    signals = {name: ([getattr(s, name) * sign for s in own],
                      [getattr(s, name) * sign for s in other])
               for name, sign in faithfulness.SIGNAL_DIRECTIONS.items()}
    signals["combined"] = ([faithfulness.combined(s) for s in own],
                           [faithfulness.combined(s) for s in other])
    reject = {"positives": [faithfulness.reason(s, rules) for s in own],
              "negatives": [faithfulness.reason(s, rules) for s in other]}
    return {"auc": {name: roc_auc(p, q) for name, (p, q) in signals.items()}, "rejects": reject,
            "n": n}


def run(size: dict[str, Any]) -> list[Row]:
    llm = LlamaCppLLM(cache_path=str(CACHE))
    made = expansions(llm, size)
    # score only what Stage 1's other filters let through would be stricter; score every non-empty
    # caption, so the figure is about faithfulness alone
    pairs = [(s, c) for s, c in zip(made["seeds"], made["captions"]) if c]
    rules = faithfulness_rules(QualityGates())
    result = score_pairs([s for s, _ in pairs], [c for _, c in pairs], rules)
    auc, n = result["auc"], result["n"]
    rejected = {k: sum(r is not None for r in v) / max(1, len(v))
                for k, v in result["rejects"].items()}
    by_reason = {k: {reason: v.count(reason) for reason in faithfulness.REASONS}
                 for k, v in result["rejects"].items()}
    deterministic = min(auc["seed_coverage"], auc["combined"])
    edited = contradiction_auc([s for s, _ in pairs], [c for _, c in pairs])
    details = {"model": llm.model_id, "seeds": size["seeds"], "scored_pairs": n,
               "seed_offset_images": size["offset"], "max_tokens": made["max_tokens"],
               "auc": {k: round(v, 4) for k, v in auc.items()},
               "thresholds": {k: v for k, v in vars(rules).items()},
               "reject_rate": {k: round(v, 4) for k, v in rejected.items()},
               "rejects_by_reason": by_reason,
               "negative_pairing": "caption i against seed (i + n/2) mod n: another image",
               "edited_seed_contradictions": edited}
    rows = [Row(BENCH, f"ROC-AUC, {name} (own seed vs another image's, {n} captions)", value,
                "AUC", "chance", 0.5, target=">= 0.9", met=value >= 0.9,
                note=("combined = coverage minus 0.25 per count, colour or object conflict"
                      if name == "combined" else faithfulness.SIGNAL_NOTES.get(name, "")),
                details=details if name == "combined" else {})
            for name, value in auc.items()]
    rows += [Row(BENCH, f"ROC-AUC, {name} (own seed vs the same seed with one "
                 f"{name.split('_')[0]} changed, {v['n']} captions)", v["auc"], "AUC", "chance",
                 0.5, target=">= 0.9", met=v["auc"] >= 0.9,
                 note=f"caught {v['caught']:.0%} of the edited seeds; flags "
                 f"{v['false_alarm_on_own_seed']:.0%} of captions against their own seed")
             for name, v in edited.items() if v["n"]]
    rows.append(Row(BENCH, "reject rate at the quality_gates thresholds: own seed (true captions)",
                    rejected["positives"], "share", "same captions against another image's seed",
                    rejected["negatives"], note=f"{by_reason['positives']} vs "
                    f"{by_reason['negatives']}; AUC of the deterministic score "
                    f"{deterministic:.3f}", details={"rejects_by_reason": by_reason}))
    return rows


