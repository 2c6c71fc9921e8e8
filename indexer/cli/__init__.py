"""The ``faceindex`` command line: each command parses, makes one library call, prints (text or --json).

``options`` holds what commands share; ``index_commands`` (ingest, watch, query, status, models),
``cluster_commands`` (cluster, export, assign, report, eval) and ``people_commands`` (the people group) hold the
commands, which are put together on the ``main`` group here. Nothing heavy is imported until a command runs, so
``--help`` answers at once.
"""

from __future__ import annotations

import logging
import sys

import click

from indexer.cli import cluster_commands, index_commands, people_commands, serve_commands
from indexer.cli.options import FaceIndexGroup


@click.group(cls=FaceIndexGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log each batch and stage timings.")
@click.version_option(package_name="faceindex")
def main(verbose: bool) -> None:
    """faceindex: find, embed, index and cluster the faces in your photos.

    Typical use: `faceindex ingest ~/Photos`, then `faceindex query me.jpg`, or leave `faceindex watch ~/Photos`
    running. Every command takes --index and --config; those that print results take --json.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("indexer").setLevel(logging.INFO)
    logging.getLogger("faceindex").setLevel(logging.INFO if verbose else logging.WARNING)


for _command in (index_commands.ingest, index_commands.watch, index_commands.query, index_commands.status,
                 index_commands.check, index_commands.models, cluster_commands.cluster, cluster_commands.export,
                 cluster_commands.assign, cluster_commands.report, cluster_commands.evaluate, people_commands.people,
                 serve_commands.serve):
    main.add_command(_command)
