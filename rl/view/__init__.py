"""`tiderl view`: a run directory as a web page (curves, samples, the per-token train-inference gap), served locally
or exported as one self-contained HTML file."""
