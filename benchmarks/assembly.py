"""Assembly overhead: the prompt gather's time over the backbone forward's, side by side.

    python -m benchmarks.assembly [--batch 32] [--text-length 64] [--prompt-length 20]

Inputs are real SST-2 dev sentences concatenated and cut to exactly
`--text-length` tokens; every row gets its own random split `b`, as under an
`instance_position` router. Writes the `assembly` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.report import device_description, write_section
from dynprompt.models import assemble, load_backbone
from dynprompt.models.assembly import Assembled, assemble_arrangements


def _sentences() -> list[str]:
    from dynprompt.training.data import data_dir

    path = data_dir() / "sst2" / "dev.tsv"
    if not path.exists():
        raise SystemExit(f"needs the real data at {path}")
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0] for line in lines]


def _median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--text-length", type=int, default=64, help="tokens per row, specials included"
    )
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args(argv)

    backbone = load_backbone("minilm", device=args.device)
    words = " ".join(_sentences())
    ids = backbone.tokenizer(words, add_special_tokens=False, verbose=False)["input_ids"]
    span = args.text_length - backbone.n_lead - backbone.n_trail
    rows = [backbone.tokenize_row("", None, args.text_length) for _ in range(args.batch)]
    for i, row in enumerate(rows):
        chunk = ids[i * span : (i + 1) * span]
        row.input_ids = row.input_ids[: backbone.n_lead] + chunk + row.input_ids[backbone.n_lead :]
        row.token_type_ids = [0] * len(row.input_ids)
    enc = backbone.collate(rows)
    L = args.prompt_length
    gen = torch.Generator().manual_seed(0)
    m = torch.full((args.batch,), L, dtype=torch.long).to(args.device)
    b = torch.randint(0, L + 1, (args.batch,), generator=gen).to(args.device)
    prompts = torch.randn(args.batch, L, backbone.hidden_size, generator=gen).to(args.device)
    tokens = backbone.embed(enc.input_ids)
    pad = backbone.embed(torch.tensor([backbone.pad_id], device=args.device))[0]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run_assembly() -> Assembled:
        return assemble(
            tokens,
            enc.token_type_ids,
            enc.lengths,
            prompts,
            m,
            b,
            pad,
            n_lead=backbone.n_lead,
            n_trail=backbone.n_trail,
        )

    assembled = run_assembly()

    def run_forward() -> torch.Tensor:
        return backbone.hidden_states(
            assembled.inputs_embeds, assembled.attention_mask, assembled.token_type_ids
        )

    cand_b = torch.arange(L + 1, device=args.device)[None, :].expand(args.batch, -1)
    cand_m = m[:, None].expand_as(cand_b)
    width = assembled.inputs_embeds.shape[1]

    def run_arrangements() -> torch.Tensor:
        return assemble_arrangements(
            tokens,
            enc.token_type_ids,
            enc.lengths,
            prompts,
            cand_m,
            cand_b,
            pad,
            n_lead=backbone.n_lead,
            n_trail=backbone.n_trail,
            seq_len=width,
        )

    with torch.inference_mode():
        # Interleave the two measurements so machine noise hits both alike.
        asm, fwd, arr = [], [], []
        for _ in range(3):
            asm.append(_median_ms(run_assembly, args.repeats, sync))
            fwd.append(_median_ms(run_forward, max(args.repeats // 3, 5), sync))
            arr.append(_median_ms(run_arrangements, max(args.repeats // 3, 5), sync))
    t_asm, t_fwd, t_arr = statistics.median(asm), statistics.median(fwd), statistics.median(arr)
    ratio = t_asm / t_fwd
    table = (
        "## Assembly overhead\n\n"
        f"Command: `python -m benchmarks.assembly --batch {args.batch} --text-length {args.text_length} "
        f"--prompt-length {L}`  \n"
        f"Device: {device_description()}; backbone MiniLM-L6 (fp32), batch {args.batch}, "
        f"text {args.text_length} tokens, L = {L}, per-row random split (instance_position).\n\n"
        "| step | median ms | over the forward |\n|---|---:|---:|\n"
        f"| backbone forward (assembled batch, {width} tokens) | {t_fwd:.2f} | 1.000 |\n"
        f"| assembly (one gather, inference) | {t_asm:.3f} | {ratio:.4f} |\n"
        f"| training arrangements (L+1 = {L + 1} candidates per row) | {t_arr:.2f} | {t_arr / t_fwd:.3f} |\n\n"
        f"Goal: assembly under 2% of the forward — **{'met' if ratio < 0.02 else 'missed'}** "
        f"({100 * ratio:.2f}%). Medians of 3 interleaved rounds.\n"
    )
    print(table)
    if not args.no_write:
        print("wrote", write_section("assembly", table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
