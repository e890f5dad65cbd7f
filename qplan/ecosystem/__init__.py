"""qplan and the trainers people already use: trl, axolotl, LLaMA-Factory.

* :func:`read_file` / :func:`check`: a trainer's config (trl's CLI YAML, trl sections, a trl
  training script, axolotl YAML, LLaMA-Factory YAML) read as the qplan configuration that
  models what that trainer does with it, estimated, with the smallest edits to the file that
  make it fit or run faster (``qplan check``);
* :func:`export`: a plan as a runnable trl script or an axolotl / LLaMA-Factory YAML
  (``qplan export``);
* :func:`to_hf`: a plan as the kwargs of BitsAndBytesConfig, LoraConfig, TrainingArguments /
  SFTConfig, and qplan's memory techniques applied to a model loaded by the user
  (``Plan.to_hf()``).

Nothing here imports torch until a model is built.
"""
from qplan.ecosystem.base import FORMATS, Edit, Reading
from qplan.ecosystem.check import CheckResult, Option, check, read_file
from qplan.ecosystem.export import Exported, Gap, export
from qplan.ecosystem.hf import HFKwargs, to_hf

__all__ = ["FORMATS", "CheckResult", "Edit", "Exported", "Gap", "HFKwargs", "Option", "Reading",
           "check", "export", "read_file", "to_hf"]
