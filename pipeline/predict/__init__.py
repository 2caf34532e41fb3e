"""Prediction: `panet predict` on images, folders and shards, and Ray Data batch inference."""
