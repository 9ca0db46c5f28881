"""Site validation: measuring the appliance on a lab's own cases."""
