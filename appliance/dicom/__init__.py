"""DICOM objects of a case for the lab's image archive (issue 41): the case pyramid as a whole-slide image series."""
