"""DICOM result writers: the SEG and TID 1500 SR objects Pleura sends back to the PACS."""
