"""Decode attention over the paged latent cache on the GPU: `mla_decode.paged_decode` (the pages read in place)
against the general path (the pages gathered, then `attention.attend`) and the bandwidth floor.

    python -m benchmarks.mla_decode [--heads 16 128] [--batch 1 8 64] [--context 1024 4096] [--drafts 1 2]
                                    [--tiles 16x4 64x8]

The attention core of one layer's decode step, from the absorbed queries (q_lat [B, S*H, C], q_R [B, S*H, R])
to o_lat [B, S*H, C]: what the engine runs between the W_UK and W_UV products. Shapes: kv_lora_rank 256 with
16 heads (`bench`) and 512 with 128 heads (V3); rope 64; block size 16, each row's blocks shuffled over the
pool, every row at full context. Each call is captured 50 times in a CUDA graph and replayed, cycling through
enough copies of the pool that each call reads its keys from HBM. floor = the cache bytes a step must read,
B x context x (C + R) x 2, over the measured device-to-device copy bandwidth. The crossover this prints is
what `mla_decode.MIN_ROWS` encodes; `--tiles` also times other query tiles of the partial kernel (what
`mla_decode.WIDE_BLOCK_Q` encodes). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import copy_bandwidth, device_name, emit_json, n_copies, print_table, replay_us
from dsv3.model.attention import attend
from dsv3.model.mla_decode import paged_decode

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
    args = ap.parse_args()
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles]
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    rows = []
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
