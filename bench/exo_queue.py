#!/usr/bin/env python3
"""Round trip and throughput of multiprocessing.Queue between two processes.

Two variants, both over a pair of mp.Queues between a parent and a spawned child:

* mp-queue:  plain blocking put/get.
* exo-style: shaped like EXO's MpSender/MpReceiver (src/exo/utils/channels.py):
  a closed-flag mp.Event checked on every operation, get_nowait before a
  blocking get, and, because callers are asyncio code, every put and get hops
  to a worker thread (EXO uses anyio.to_thread.run_sync; here a one-worker
  ThreadPoolExecutor per direction) from an asyncio loop on both sides.

Usage: python3 bench/exo_queue.py [--quick]. Python 3.11 stdlib only.
Prints markdown tables and `RESULT key=value` lines for scripts.
"""

import asyncio
import multiprocessing as mp
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from queue import Empty

SMALL, LARGE = 64, 1 << 20
END = None  # end-of-stream marker


class ExoSide:
    """One process's end: send on `tx`, receive on `rx`, EXO's way."""

    def __init__(self, tx, rx, tx_closed, rx_closed):
        self.tx, self.rx = tx, rx
        self.tx_closed, self.rx_closed = tx_closed, rx_closed
        self.send_pool = ThreadPoolExecutor(max_workers=1)
        self.recv_pool = ThreadPoolExecutor(max_workers=1)

    def send_sync(self, item):
        if self.tx_closed.is_set():
            raise RuntimeError("closed")
        self.tx.put(item)

    def recv_sync(self):
        if self.rx_closed.is_set():
            raise RuntimeError("closed")
        try:
            return self.rx.get(block=False)
        except Empty:
            return self.rx.get()

    async def send(self, item):
        await asyncio.get_running_loop().run_in_executor(self.send_pool, self.send_sync, item)

    async def recv(self):
        return await asyncio.get_running_loop().run_in_executor(self.recv_pool, self.recv_sync)

    def shutdown(self):
        self.send_pool.shutdown()
        self.recv_pool.shutdown()


# ---- child process ---------------------------------------------------------

def child(mode, role, q_in, q_out, closed_in, closed_out, results):
    """Echo (role "echo") or count until END (role "consume"), then exit."""
    if mode == "exo":
        asyncio.run(child_async(role, ExoSide(q_out, q_in, closed_out, closed_in), results))
        return
    results.put("ready")
    n = 0
    while (msg := q_in.get()) is not END:
        if role == "echo":
            q_out.put(msg)
        n += 1
    results.put((n, time.monotonic_ns()))


async def child_async(role, side, results):
    results.put("ready")
    n = 0
    while (msg := await side.recv()) is not END:
        if role == "echo":
            await side.send(msg)
        n += 1
    results.put((n, time.monotonic_ns()))
    side.shutdown()


# ---- parent ----------------------------------------------------------------

def start(ctx, mode, role):
    q_ab, q_ba, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    c_ab, c_ba = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=child, args=(mode, role, q_ab, q_ba, c_ab, c_ba, results))
    proc.start()
    assert results.get() == "ready"
    return proc, results, (q_ab, q_ba, c_ab, c_ba)


def finish(proc, results):
    n, t_end = results.get()
    proc.join()
    return n, t_end


def rtt(ctx, mode, size, warmup, iters):
    proc, results, (q_ab, q_ba, c_ab, c_ba) = start(ctx, mode, "echo")
    payload = b"\xa5" * size
    clock = time.perf_counter_ns
    samples = []
    if mode == "exo":
        async def run():
            side = ExoSide(q_ab, q_ba, c_ab, c_ba)
            msg = payload
            for i in range(warmup + iters):
                t = clock()
                await side.send(msg)
                msg = await side.recv()
                if i >= warmup:
                    samples.append(clock() - t)
            await side.send(END)
            side.shutdown()
            return msg
        msg = asyncio.run(run())
    else:
        msg = payload
        for i in range(warmup + iters):
            t = clock()
            q_ab.put(msg)
            msg = q_ba.get()
            if i >= warmup:
                samples.append(clock() - t)
        q_ab.put(END)
    assert len(msg) == size
    finish(proc, results)
    return samples


def tput(ctx, mode, size, count):
    """Seconds from the first put until the child saw END (monotonic clock)."""
    proc, results, (q_ab, q_ba, c_ab, c_ba) = start(ctx, mode, "consume")
    payload = b"\xa5" * size
    t0 = time.monotonic_ns()
    if mode == "exo":
        async def run():
            side = ExoSide(q_ab, q_ba, c_ab, c_ba)
            for _ in range(count):
                await side.send(payload)
            await side.send(END)
            side.shutdown()
        asyncio.run(run())
    else:
        for _ in range(count):
            q_ab.put(payload)
        q_ab.put(END)
    n, t_end = finish(proc, results)
    assert n == count, (n, count)
    return (t_end - t0) / 1e9


def percentiles(samples_ns):
    s = sorted(samples_ns)
    at = lambda q: s[round((len(s) - 1) * q)] / 1e3
    return at(0.5), at(0.99)


def main():
    quick = "--quick" in sys.argv[1:]
    # (size, warmup, iters, stream count)
    plans = (
        [(SMALL, 200, 2_000, 20_000), (LARGE, 3, 30, 50)]
        if quick
        else [(SMALL, 2_000, 20_000, 200_000), (LARGE, 30, 300, 500)]
    )
    ctx = mp.get_context("spawn")
    variants = [("mp-queue", "plain", "mp_queue"), ("exo-style", "exo", "exo")]
    rtt_rows, tput_rows = [], []
    for size, warmup, iters, count in plans:
        label, key = ("64 B", "64") if size == SMALL else ("1 MiB", "1m")
        for name, mode, rkey in variants:
            median, p99 = percentiles(rtt(ctx, mode, size, warmup, iters))
            print(f"RESULT {rkey}_rtt_{key}_median_us={median:.2f}", flush=True)
            print(f"RESULT {rkey}_rtt_{key}_p99_us={p99:.2f}", flush=True)
            rtt_rows.append(f"| {name} | {label} | {iters} | {median:.1f} | {p99:.1f} |")
        for name, mode, rkey in variants:
            msgs = count / tput(ctx, mode, size, count)
            mib = msgs * size / (1 << 20)
            print(f"RESULT {rkey}_tput_{key}_msgs_per_s={msgs:.0f}", flush=True)
            tput_rows.append(f"| {name} | {label} | {count} | {msgs:.0f} | {mib:.1f} |")
    print()
    print("### multiprocessing.Queue round trip (2 processes, spawn)\n")
    print("| variant | payload | iters | median µs | p99 µs |")
    print("|---|---|---|---|---|")
    print("\n".join(rtt_rows))
    print()
    print("### multiprocessing.Queue throughput (one way, N messages then END, timed at the receiver)\n")
    print("| variant | payload | messages | msg/s | MiB/s |")
    print("|---|---|---|---|---|")
    print("\n".join(tput_rows))


if __name__ == "__main__":
    main()
