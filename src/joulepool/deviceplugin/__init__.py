"""Fake kubelet device plugin (v1beta1) for kind."""
