"""Stopping a private `ray start --head --block` that a test started (test_jobs, test_autoscaling).

Never `ray stop`: it kills every Ray process on the machine, other sessions' clusters too. Everything stopped
here is the test's own: the head's process group, and processes whose command line names its temp dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import psutil


def own_processes(temp: str) -> list[psutil.Process]:
    """Every process whose command line names the head's temp dir: the head's, and those started outside its
    process group (the fake autoscaler's nodes: raylets, agents, their workers)."""
    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(temp in arg for arg in p.info["cmdline"] or ()):
                mine.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return mine


def stop_private_head(proc: subprocess.Popen, temp: str) -> None:
    """`ray start --block` stops its processes itself on SIGTERM, but waits ~30 s on busy ones (signalling
    its whole group is no faster); they are all ours, so after 10 s they are killed. Then the temp dir goes."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    left = own_processes(temp)
    for p in left:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(temp, ignore_errors=True)
