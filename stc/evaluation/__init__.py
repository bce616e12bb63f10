"""Measuring a concept the way the personalization papers do (``stc eval``): metrics, protocol, plot."""
