"""What every stage shares: the settings, the devices, the stage cache with each stage's fingerprint, the output
paths and the stage timer.
"""

import argparse
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from scan.backend import enable_compilation_cache
from scan.cache import StageCache, stage_fingerprints
from scan.names import display_name


class StageTimes:
    """The seconds spent in each stage, and what the backend compiled there (a CompilationLog)."""

    def __init__(self, compilation_log):
        self.compilation_log = compilation_log
        self.seconds = {}
        self.compilations = {}

    @contextmanager
    def stage(self, name):
        """Records the seconds spent in the `with` block and prints what was compiled in it."""
        started, mark = time.time(), self.compilation_log.mark()
        yield
        self.seconds[name] = round(time.time() - started, 2)
        compiled = self.compilation_log.since(mark)
        if compiled["programs"]:
            self.compilations[name] = compiled
            steps = "".join(f", {count} {step}" for step, count in compiled["steps"].items())
            print(
                f"{name}: {compiled['programs']} XLA programs{steps} ready in {compiled['seconds']:.1f} s: "
                f"{compiled['programs'] - compiled['from_cache']} compiled, {compiled['from_cache']} loaded from the "
                "compilation cache"
            )


@dataclass
class Run:
    """What every stage shares: the settings, the devices, the stage timer and, once the data has passed every check,
    the stage cache with each stage's fingerprint."""

    settings: argparse.Namespace
    gpus: list  # find_gpus()
    num_devices: int  # the devices each step runs data-parallel over
    times: StageTimes
    cache: StageCache | None = None  # set by open_cache
    fingerprints: dict | None = None  # {stage: fingerprint}, set by open_cache
    figures: list = field(default_factory=list)  # the file names of the figures this run drew, by figure_path
    data_digest: str | None = None  # data_fingerprint of the training images, set by open_cache
    stage_settings: dict | None = None  # STAGE_SETTINGS, set by open_cache

    def output_path(self, name):
        """Where the output `name` (metrics.json, a table) is written."""
        return os.path.join(self.settings.output_dir, name)

    def figure_path(self, name):
        """Where the figure `name` is saved; notes it among this run's `figures`, which report.html shows (not
        those an earlier run left in OUTPUT_DIR)."""
        if name not in self.figures:
            self.figures.append(name)
        return self.output_path(name)

    def open_cache(self, data_digest, stage_settings):
        """Fingerprints every stage (STAGE_SETTINGS: `stage_settings`) and creates the cache folder, with the
        compilation cache in it: the first thing the run writes."""
        self.data_digest, self.stage_settings = data_digest, stage_settings
        self.fingerprints = stage_fingerprints(data_digest, vars(self.settings), stage_settings)
        self.cache = StageCache(os.path.join(self.settings.output_dir, "cache"), self.settings.resume)
        os.makedirs(self.cache.folder, exist_ok=True)
        compiled = os.path.join(self.cache.folder, "compiled")
        if self.settings.compilation_cache and enable_compilation_cache(compiled):
            print(f"compilation cache: {display_name(compiled)}")

    def set_num_clusters(self, num_clusters):
        """NUM_CLUSTERS = 0 became `num_clusters`, chosen from the data: the stages from clustering on are fingerprinted
        as if it had been given, so that a run with --num_clusters=`num_clusters` reuses them."""
        self.settings.num_clusters = num_clusters
        self.fingerprints.update(stage_fingerprints(self.data_digest, vars(self.settings), self.stage_settings))
