"""Metrics: FID against NVIDIA's Inception detector (EDM's protocol) and the demo digit classifier.

Imports only torch/numpy/scipy and the lower layers (d2o_fast.nets, d2o_fast.checkpoint, d2o_fast.data);
never the training engine.
"""

from d2o_fast.metrics.demo_classifier import (DemoClassifier, demo_metrics, demo_reference_stats,
                                              load_demo_classifier, train_demo_classifier)
from d2o_fast.metrics.detector import (INCEPTION_PKL_URL, INCEPTION_PT_URL, extract_features, load_detector,
                                       missing_detector_message)
from d2o_fast.metrics.errors import MetricsError
from d2o_fast.metrics.feature_stats import FeatureStats, frechet_distance, load_stats, save_stats
from d2o_fast.metrics.fid import (FULL_FID_IMAGES, accumulate_stats, fid_from_stats, fid_label, generate_uint8,
                                  generator_stats, image_stats, images_to_uint8, parse_seeds, rank_batches,
                                  seed_latents)

__all__ = ['MetricsError', 'FeatureStats', 'frechet_distance', 'load_stats', 'save_stats', 'INCEPTION_PKL_URL',
           'INCEPTION_PT_URL', 'load_detector', 'extract_features', 'missing_detector_message', 'FULL_FID_IMAGES',
           'fid_label', 'images_to_uint8', 'rank_batches', 'accumulate_stats', 'image_stats', 'parse_seeds',
           'seed_latents', 'generate_uint8', 'generator_stats', 'fid_from_stats', 'DemoClassifier', 'demo_metrics',
           'demo_reference_stats', 'load_demo_classifier', 'train_demo_classifier']
