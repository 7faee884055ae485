// The median of a benchmark's timings (the upper one of an even count), as every bench binary reports.
#pragma once
#include <algorithm>
#include <vector>

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
