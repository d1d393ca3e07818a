"""Decode attention over the paged latent cache on the GPU: `mla_decode.paged_decode` (the pages read in place)
against the general path (the pages gathered, then `attention.attend`) and the bandwidth floor.

    python -m benchmarks.mla_decode [--heads 16 128] [--batch 1 8 64] [--context 1024 4096] [--drafts 1 2]
                                    [--tiles 16x4 64x8]
    python -m benchmarks.mla_decode --absorb [16 32 64 128] [--heads 16 128] [--batch 1 8]

The attention core of one layer's decode step, from the absorbed queries (q_lat [B, S*H, C], q_R [B, S*H, R])
to o_lat [B, S*H, C]: what the engine runs between the W_UK and W_UV products. Shapes: kv_lora_rank 256 with
16 heads (`bench`) and 512 with 128 heads (V3); rope 64; block size 16, each row's blocks shuffled over the
pool, every row at full context. Each call is captured 50 times in a CUDA graph and replayed, cycling through
enough copies of the pool that each call reads its keys from HBM. floor = the cache bytes a step must read,
B x context x (C + R) x 2, over the measured device-to-device copy bandwidth. The crossover this prints is
what `mla_decode.MIN_ROWS` encodes; `--tiles` also times other query tiles of the partial kernel (what
`mla_decode.WIDE_BLOCK_Q` encodes). Prints a table, then one JSON line.

`--absorb [COLUMNS ...]` times the step before instead: `mla_decode.absorb_query` (q_C W_UK of every head and
q_R's RoPE in one launch) against the two launches it replaces (the batched GEMM and `rope.apply_rope`), for
nope 128 and the same ranks, W_UK cycled through copies so each call reads it from HBM (floor: its bytes over
the copy bandwidth), and with each given number of latent columns per program (what the default encodes).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import copy_bandwidth, device_name, emit_json, n_copies, print_table, replay_us
from dsv3.model.attention import attend
from dsv3.model.mla_decode import absorb_query, paged_decode
from dsv3.model.rope import apply_rope

ROPE, BLOCK_SIZE = 64, 16
RANK = {16: 256, 128: 512}  # heads -> kv_lora_rank: `bench`, V3


def case(B: int, T: int, H: int, S: int, bw: float, dev: torch.device, tiles: list[tuple[int, int]],
         splits: list[int]) -> dict:
    C, bs = RANK.get(H, 512), BLOCK_SIZE
    D = C + ROPE
    W = T // bs
    Q = S * H
    nbytes = B * T * D * 2
    copies = n_copies(nbytes)
    pools = [torch.randn(B * W * bs, D, device=dev, dtype=torch.bfloat16) * 0.5 for _ in range(copies)]
    tables = torch.stack([torch.randperm(B * W, device=dev)[:W] for _ in range(B)]).to(torch.int32)
    pos = (T - S + torch.arange(S, device=dev)).repeat_interleave(H).expand(B, Q).contiguous()  # full rows
    q_lat = torch.randn(B, Q, C, device=dev, dtype=torch.bfloat16)
    q_pe = torch.randn(B, Q, ROPE, device=dev, dtype=torch.bfloat16)
    scale = D**-0.5

    def gathered(i: int) -> torch.Tensor:  # PagedStep.update's copy, then MLA.absorbed's attend
        kv = pools[i].view(-1, bs, D).index_select(0, tables.flatten()).view(B, W * bs, D)
        q = torch.cat([q_lat, q_pe], dim=-1).unsqueeze(1)
        return attend(q, kv.unsqueeze(1), kv[..., :C].unsqueeze(1), scale, pos)

    def paged(i: int, block_q: int | None = None, warps: int | None = None, splits: int | None = None) -> torch.Tensor:
        return paged_decode(q_lat, q_pe, pools[i], tables, bs, pos, scale, block_q, warps, splits)

    floor = nbytes / bw * 1e6
    row = {"heads": H, "B": B, "context": T, "drafts": S, "cache MB": round(nbytes / 1e6, 1),
           "floor us": round(floor, 1)}
    with torch.no_grad():
        want = gathered(0)[:, 0].float()
        row["gathered us"] = round(t_gather := replay_us(gathered, copies), 1)
        for bq, warps in [(None, None), *tiles]:  # the kernel's own choice, then the tiles asked for
            if bq is not None and bq > 16 and bq >= 2 * Q:
                continue  # a tile twice the queries: nothing to learn
            key = "paged us" if bq is None else f"paged {bq}q/{warps}w us"
            err = ((paged(0, bq, warps).float() - want).norm() / want.norm()).item()  # agree before timing
            t = replay_us(lambda i, bq=bq, warps=warps: paged(i, bq, warps), copies)
            row[key] = round(t, 1)
            row[key.replace(" us", "/gathered")] = round(t / t_gather, 2)
            row[key.replace(" us", " % of bw")] = round(100 * floor / t, 1)
            row[key.replace(" us", " rel diff")] = f"{err:.1e}"
        for n in splits:  # key splits per row other than the default (what MAX_SPLITS encodes)
            row[f"{n} splits us"] = round(replay_us(lambda i, n=n: paged(i, splits=n), copies), 1)
    return row


def absorb_case(B: int, H: int, S: int, bw: float, dev: torch.device, columns: list[int]) -> dict:
    """absorb_query against the batched GEMM + RoPE it replaces, for B rows of S positions and H heads."""
    C, D, V = RANK.get(H, 512), 128, 128
    nbytes = H * D * C * 2
    copies = n_copies(nbytes)
    w_uk = [torch.randn(H, D + V, C, device=dev, dtype=torch.bfloat16)[:, :D] * D**-0.5 for _ in range(copies)]
    q = torch.randn(B, S, H, D + ROPE, device=dev, dtype=torch.bfloat16)
    angle = torch.rand(B, S, ROPE // 2, device=dev) * 6.28
    cos, sin = angle.cos(), angle.sin()

    def two_launches(i: int) -> tuple[torch.Tensor, torch.Tensor]:  # what MLA.absorbed runs
        q_nope, q_pe = q.split([D, ROPE], dim=-1)
        return torch.einsum("bshd,hdc->bshc", q_nope, w_uk[i]), apply_rope(q_pe, cos, sin)

    floor = nbytes / bw * 1e6
    row = {"heads": H, "B": B, "drafts": S, "W_UK MB": round(nbytes / 1e6, 1), "floor us": round(floor, 1)}
    with torch.no_grad():
        want_lat, want_pe = (t.flatten(1, 2).float() for t in two_launches(0))
        row["two launches us"] = round(t_two := replay_us(two_launches, copies), 1)
        for c in [None, *columns]:
            key = "absorb us" if c is None else f"absorb {c} cols us"
            got_lat, got_pe = absorb_query(q, cos, sin, w_uk[0], c)
            err = max(((got.float() - want).norm() / want.norm()).item()
                      for got, want in ((got_lat, want_lat), (got_pe, want_pe)))
            if err > 1e-2:  # agree before timing
                raise RuntimeError(f"absorb_query ({c} columns) differs from the two launches: {err:.1e}")
            t = replay_us(lambda i, c=c: absorb_query(q, cos, sin, w_uk[i], c), copies)
            row[key] = round(t, 2)
            row[key.replace(" us", "/two")] = round(t / t_two, 2)
            row[key.replace(" us", " rel diff")] = f"{err:.1e}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, nargs="+", default=[16, 128], help="16: bench's shapes; 128: V3's")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 64])
    ap.add_argument("--context", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--drafts", type=int, nargs="+", default=[1], help="query positions per row (MTP: 1 + k)")
    ap.add_argument("--tiles", nargs="*", default=[],
                    help="also time these queries x warps per partial program, e.g. 16x4 32x8 64x8")
    ap.add_argument("--splits", type=int, nargs="*", default=[],
                    help="also time the paged kernel with these key splits per row (default: its own choice)")
    ap.add_argument("--absorb", type=int, nargs="*", default=None, metavar="COLUMNS",
                    help="time absorb_query instead (and with these latent columns per program)")
    args = ap.parse_args()
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles]
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    rows = []
    if args.absorb is not None:
        for H in args.heads:
            for S in args.drafts:
                for B in args.batch:
                    rows.append(absorb_case(B, H, S, bw, dev, args.absorb))
                    print(rows[-1], flush=True)
        print(f"\nabsorbed decode query (W_UK + RoPE), {device_name(dev)}, copy bandwidth {bw / 1e12:.2f} TB/s; "
              "floor = W_UK bytes / bandwidth; two launches = batched GEMM + apply_rope")
        print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
        emit_json({"bench": "mla_decode.absorb", "device": device_name(dev), "copy_bandwidth": bw,
                   "torch": torch.__version__, "rows": rows})
        return
    for H in args.heads:
        for S in args.drafts:
            for T in args.context:
                for B in args.batch:
                    rows.append(case(B, T, H, S, bw, dev, tiles, args.splits))
                    print(rows[-1], flush=True)
    print(f"\ndecode attention over paged latents, {device_name(dev)}, copy bandwidth {bw / 1e12:.2f} TB/s; "
          "floor = cache bytes / bandwidth; gathered = index_select of the pages + attend (the path below "
          "mla_decode.MIN_ROWS rows)")
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    emit_json({"bench": "mla_decode", "device": device_name(dev), "copy_bandwidth": bw, "torch": torch.__version__,
               "rows": rows})


if __name__ == "__main__":
    main()
