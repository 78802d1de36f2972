"""Checkpoints written by earlier versions restore into this one: orbax restores by tree path and shape, so the
models' parameter, codebook and batch-norm trees must keep their paths and shapes. tests/data/checkpoint_trees.json
holds them as the version before the models took their conv layer as an argument wrote them."""
import json
import os

import jax
import pytest

from configs import gan as gan_configs
from configs import vqvae as vqvae_configs
from oasis_jax.training import gan_trainer, vqvae_trainer

TREES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'checkpoint_trees.json')


MODEL_PARTS = ("['params']", "['vq']", '.params', '.batch_stats')   # what the models define (not optimiser state)
# Recipe fields that have changed since the trees were recorded: the models are built as the recorded runs were.
RECORDED_WITH = {'gan:demo': {'generator_width': 32, 'upsample': 'subpixel', 'generator_final_convs': 0}}


def paths_and_shapes(tree) -> dict:
  """{keystr path: [*shape, dtype]} of the model leaves of tree (parameters, codebook state, batch-norm averages)."""
  leaves = [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return {path: list(leaf.shape) + [str(leaf.dtype)] for path, leaf in leaves
          if any(part in path for part in MODEL_PARTS)}


@pytest.mark.parametrize('variant', ['default', 'demo'])
def test_model_trees_match_what_earlier_checkpoints_hold(variant):
  with open(TREES) as f:
    recorded = json.load(f)
  stage1 = vqvae_configs.get_config(variant)
  state = jax.eval_shape(lambda key: vqvae_trainer.create_state(stage1, key), jax.random.key(0))
  expected = recorded[f'vqvae:{variant}']
  assert paths_and_shapes({'params': state.params, 'vq': state.vq}) == expected
  gan = gan_configs.get_config(variant)
  gan.update(RECORDED_WITH.get(f'gan:{variant}', {}))
  states = jax.eval_shape(lambda key: gan_trainer.create_states(gan, stage1, key), jax.random.key(0))
  expected = recorded[f'gan:{variant}:logits']
  assert paths_and_shapes(states) == expected
