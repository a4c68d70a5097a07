"""One module per method; `get(name)` imports the one a config names."""

import importlib

from sslj.errors import UserError

# method name -> module under sslj.methods
METHODS = {
    'supervised': 'supervised',
    'mean_teacher': 'mean_teacher',
    'kmeans_svm': 'kmeans_features',
    'exemplar_cnn': 'exemplar_cnn',
    'fixmatch': 'fixmatch',
    'pseudo_label': 'pseudo_label',
    'kmeans_pseudo_label': 'kmeans_pseudo_label',
    'ssl_gan': 'ssl_gan',
    'deep_cluster': 'deep_cluster',
}


def get(name: str):
  if name not in METHODS:
    raise UserError(f"method '{name}' is unknown; known methods: {', '.join(sorted(METHODS))}.")
  return importlib.import_module(f'sslj.methods.{METHODS[name]}')
