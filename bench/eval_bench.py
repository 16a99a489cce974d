"""CMMLU throughput: llamatron's evaluator against lm-evaluation-harness's HF backend, same model, same files.

    python bench/eval_bench.py --out eval_bench.json                 # one GPU, llama3.2-1b shape, bf16
    python bench/eval_bench.py --model tiny --device cpu --subjects 2 --questions 4 --out /tmp/e.json  # smoke

The model is a random-init Llama of the chosen preset saved as a HF directory with the Llama 3 tokenizer;
the data are generated CMMLU-layout CSVs (dev/ and test/, real subject names, Chinese text). Both sides
load the model before the clock starts; the timed part is everything from question files to scores
(lm-eval: simple_evaluate on a built HFLM, with its own cmmlu YAMLs pointed at the files). The JSON holds
questions/s for each, the speedup, and how many per-question predictions agree.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

# Common characters so prompts tokenize like real Chinese exam text (several tokens per character).
CHARS = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坏兴切随准"
SUBJECTS = ["agronomy", "anatomy", "ancient_chinese", "arts", "astronomy", "business_ethics", "chinese_history",
            "chinese_literature", "college_law", "computer_science", "economics", "education", "ethnology",
            "genetics", "global_facts", "journalism", "logical", "management", "marketing", "nutrition"]


def write_cmmlu(root: Path, *, subjects: int, questions: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return "".join(rng.choice(CHARS) for _ in range(rng.randint(lo, hi)))

    names = SUBJECTS[:subjects]
    for name in names:
        for split, count in (("dev", 5), ("test", questions)):
            (root / split).mkdir(parents=True, exist_ok=True)
            with open(root / split / f"{name}.csv", "w", encoding="utf-8", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for i in range(count):
                    writer.writerow([i, text(15, 80) + "？", *(text(2, 12) for _ in range(4)), rng.choice("ABCD")])
    return names


def build_model_dir(out: Path, *, preset_name: str, dtype: str) -> Path:
    import torch

    from llamatron.checkpoint.hf import save_hf_model
    from llamatron.model import build_model, preset

    if preset_name == "tiny":
        from llamatron.model import LlamaConfig

        config = LlamaConfig(vocab_size=128256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             ffn_hidden_size=128, max_position_embeddings=4096, tie_word_embeddings=True,
                             bos_token_id=128000, eos_token_id=128001)
    else:
        config = preset(preset_name)
    model = build_model(config, seed=1234)
    return save_hf_model(model, out, dtype=getattr(torch, dtype), tokenizer="llama3")


def run_llamatron(model_dir: Path, data: Path, *, shots: int, device: str, dtype: str, batch_size: int | None) -> dict:
    import torch

    from llamatron.checkpoint.loader import load_model
    from llamatron.eval.runner import EvalConfig, aggregate, build_prompts, score_prompts
    from llamatron.eval.tasks import resolve_tasks

    model, tok = load_model(model_dir, device=device, dtype=getattr(torch, dtype))
    selections = resolve_tasks("cmmlu")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    prompts = build_prompts(selections, data_dir=data, tok=tok, config=EvalConfig(shots=shots),
                            max_length=model.config.max_position_embeddings, warn=lambda _: None)
    results = score_prompts(model, prompts, batch_size=batch_size)
    sync()
    seconds = time.perf_counter() - start
    del model
    return {"seconds": seconds, "questions": len(results), "questions_per_s": len(results) / seconds,
            "acc": aggregate(results, selections)["cmmlu"]["acc"],
            "preds": {f"{r.subject}/{r.index}": r.pred for r in results}}


def run_lm_eval(model_dir: Path, data: Path, names: list[str], *, shots: int, device: str, dtype: str,
                batch_size: str) -> dict:
    import lm_eval
    import torch
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks_dir = Path(lm_eval.__file__).parent / "tasks" / "cmmlu"
    include = Path(tempfile.mkdtemp(prefix="lm-eval-tasks-"))
    for name in names:
        config = yaml.safe_load((tasks_dir / f"cmmlu_{name}.yaml").read_text(encoding="utf-8"))
        config.update(task=f"bench_cmmlu_{name}", include=str(tasks_dir / "_default_template_yaml"),
                      dataset_path="csv", dataset_name=None,
                      dataset_kwargs={"data_files": {s: str(data / s / f"{name}.csv") for s in ("test", "dev")}})
        (include / f"bench_cmmlu_{name}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    lm = HFLM(pretrained=str(model_dir), dtype=dtype, device=device, batch_size=batch_size)
    manager = TaskManager(include_path=str(include))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[f"bench_cmmlu_{n}" for n in names], num_fewshot=shots,
                          task_manager=manager, log_samples=True)
    sync()
    seconds = time.perf_counter() - start
    preds, correct = {}, 0
    for task, samples in out["samples"].items():
        for s in samples:
            lls = [float(r[0]) for r in s["filtered_resps"]]
            preds[f"{task.removeprefix('bench_cmmlu_')}/{s['doc_id']}"] = max(range(4), key=lambda i: (lls[i], -i))
            correct += int(s["acc"])
    return {"seconds": seconds, "questions": len(preds), "questions_per_s": len(preds) / seconds,
            "acc": correct / len(preds), "preds": preds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3.2-1b", help="A llamatron preset, or tiny (smoke test).")
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--questions", type=int, default=200, help="Test questions per subject.")
    parser.add_argument("--shots", default="0,5", help="Comma-separated shot counts, each benchmarked.")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", default="auto", help="llamatron rows per batch, or auto (token budget).")
    parser.add_argument("--lm-eval-batch-size", default="16", help="lm-eval's --batch_size (the seed uses 16).")
    parser.add_argument("--out", type=Path, default=Path("eval_bench.json"))
    args = parser.parse_args()

    import torch

    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    names = write_cmmlu(work / "cmmlu", subjects=args.subjects, questions=args.questions)
    model_dir = build_model_dir(work / "model", preset_name=args.model, dtype=args.dtype)
    report = {"model": args.model, "dtype": args.dtype, "subjects": args.subjects, "questions": args.questions,
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "runs": []}
    batch = None if args.batch_size == "auto" else int(args.batch_size)
    for shots in (int(s) for s in args.shots.split(",")):
        ours = run_llamatron(model_dir, work / "cmmlu", shots=shots, device=args.device, dtype=args.dtype,
                             batch_size=batch)
        ref = run_lm_eval(model_dir, work / "cmmlu", names, shots=shots, device=args.device, dtype=args.dtype,
                          batch_size=args.lm_eval_batch_size)
        agree = sum(ours["preds"][k] == ref["preds"].get(k) for k in ours["preds"])
        run = {"shots": shots, "questions": ours["questions"],
               "llamatron": {k: v for k, v in ours.items() if k != "preds"},
               "lm_eval_hf": {k: v for k, v in ref.items() if k != "preds"},
               "speedup": ours["questions_per_s"] / ref["questions_per_s"], "predictions_agree": agree}
        report["runs"].append(run)
        print(json.dumps(run), file=sys.stderr)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
