"""A user reward file (verl signature) that gives an untrained policy varying rewards: shorter answers score more."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return 1.0 / (1.0 + len(solution_str) / 10.0)
