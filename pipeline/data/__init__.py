"""Sharded records: converters, synthetic data, Ray Data reading and augmentation."""
