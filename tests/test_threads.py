"""Default thread count from the CPU topology, on fake sysfs trees."""

from __future__ import annotations

import sys

import pytest

from args_local.runtime.cpus import physical_cores, usable_cpus


def fake_sysfs(root, siblings: dict[int, str]):
    """A /sys/devices/system/cpu with one thread_siblings_list per logical CPU."""
    for cpu, text in siblings.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(text + "\n")
    return root


def test_one_thread_per_core_counts_every_cpu(tmp_path):
    """This machine's case (AMD, 1 thread per core): cpu_count() // 2 would say 1."""
    sysfs = fake_sysfs(tmp_path, {0: "0", 1: "1"})
    assert physical_cores([0, 1], sysfs) == 2


def test_hyper_threads_of_one_core_count_once(tmp_path):
    sysfs = fake_sysfs(tmp_path, {0: "0,4", 1: "1,5", 2: "2,6", 3: "3,7", 4: "0,4", 5: "1,5", 6: "2,6", 7: "3,7"})
    assert physical_cores(range(8), sysfs) == 4


def test_only_the_cpus_the_process_may_use(tmp_path):
    """A container or taskset that allows two threads of one core gets one thread."""
    sysfs = fake_sysfs(tmp_path, {0: "0-1", 1: "0-1", 2: "2-3", 3: "2-3"})
    assert physical_cores([0, 1], sysfs) == 1
    assert physical_cores([1, 2], sysfs) == 2


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS asks sysctl instead")
def test_without_topology_files_llama_cpp_s_guess(tmp_path):
    assert physical_cores(range(4), tmp_path) == 4  # small machines rarely have hyper-threads
    assert physical_cores(range(16), tmp_path) == 8
    partial = fake_sysfs(tmp_path / "partial", {0: "0,1"})  # cpu1's file missing: no half answer
    assert physical_cores(range(2), partial) == 2


def test_the_real_machine_within_its_cpus():
    assert 1 <= physical_cores() <= len(usable_cpus())


@pytest.mark.parametrize("parallel, lanes, sizes", [
    (4, 1, [4]),  # the default: one batch
    (4, 2, [2, 2]),
    (5, 2, [3, 2]),
    (1, 2, [1]),  # never more lanes than sequences
    (4, 3, [2, 1, 1]),
])
def test_the_server_s_sequences_split_over_its_lanes(parallel, lanes, sizes):
    from args_local.serve import ServeOptions

    assert ServeOptions(parallel=parallel, lanes=lanes).lane_sizes() == sizes


@pytest.mark.slow
def test_each_thread_is_charged_its_own_reward_calls(reward):
    """The server's lanes score on their own threads with one session: a request's cost
    (RewardStats.since) must count its own thread's calls, not the other lane's."""
    import threading

    import numpy as np

    counts = {"a": 7, "b": 3}
    seen: dict[str, tuple[int, int, int]] = {}
    start = threading.Barrier(2)

    def work(name: str) -> None:
        before = reward.stats.copy()
        start.wait()
        for i in range(counts[name]):
            reward.score_ids([[1, 2, 3 + i]])
        cost = reward.stats.since(before)
        seen[name] = (cost.calls, cost.candidates, len(reward.last_raw))

    threads = [threading.Thread(target=work, args=(n,)) for n in counts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": (7, 7, 1), "b": (3, 3, 1)}
    assert np.isfinite(reward.last_raw).all()
