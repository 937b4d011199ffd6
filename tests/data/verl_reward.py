"""A reward file as a verl user writes it (verl's `compute_score` convention), used unchanged by tiderl."""

import re


def extract_solution(solution_str):
    # the last number of the answer, GSM8K-style flexible extraction
    numbers = re.findall(r"-?[0-9][0-9,]*\.?[0-9]*", solution_str.split("</think>")[-1])
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def compute_score(data_source, solution_str, ground_truth, extra_info=None, format_score=0.0, score=1.0):
    answer = extract_solution(solution_str)
    if answer is None:
        return 0.0
    return score if answer == str(ground_truth) else format_score
