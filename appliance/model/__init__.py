"""A model as the appliance runs it: the validated manifest, the inference engines, and plain-numpy metrics."""
