#pragma once
// Output formats for evaluation tables: an aligned plain-text table, CSV, JSON, and a Markdown comparison of
// several methods. Every format states the protocol, since numbers of the two protocols are not comparable.

#include "tdfusion/metrics/evaluate_folders.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace tdfusion::metrics {

namespace detail {

inline std::string format_number(double value, int precision) {
  if (std::isnan(value)) return "nan";
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), "%.*f", precision, value);
  return buffer;
}

inline std::string csv_field(const std::string& text) {
  if (text.find_first_of(",\"\n\r") == std::string::npos) return text;
  std::string quoted = "\"";
  for (char c : text) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
  return quoted + "\"";
}

inline std::string markdown_cell(const std::string& text) {
  std::string escaped;
  for (char c : text) escaped += c == '|' ? std::string("\\|") : std::string(1, c);
  return escaped;
}

inline void check_comparable(const std::vector<EvaluationTable>& tables, const char* what) {
  if (tables.empty()) throw std::invalid_argument(std::string("tdfusion: ") + what + " needs at least one table");
  for (const EvaluationTable& table : tables) {
    if (table.protocol != tables.front().protocol) {
      throw std::invalid_argument(std::string("tdfusion: ") + what + " cannot compare '" + tables.front().method +
                                  "' (protocol " + protocol_name(tables.front().protocol) + ") with '" +
                                  table.method + "' (protocol " + protocol_name(table.protocol) +
                                  "): numbers of different protocols are not comparable");
    }
  }
}

}  // namespace detail

/// An aligned plain-text table: one row per image, then the mean, the protocol, and the stems that were not
/// evaluated because a folder lacks them.
inline std::string format_table(const EvaluationTable& table, int precision = 4) {
  std::vector<std::vector<std::string>> cells;
  std::vector<std::string> header = {"image"};
  header.insert(header.end(), table.metrics.begin(), table.metrics.end());
  cells.push_back(header);
  auto add = [&](const std::string& name, const MetricRow& row) {
    std::vector<std::string> line = {name};
    for (const auto& value : row.values) line.push_back(detail::format_number(value.second, precision));
    cells.push_back(line);
  };
  for (const ImageMetrics& row : table.rows) add(row.image, row.metrics);
  add("mean", table.mean);
  std::vector<std::size_t> width(header.size(), 0);
  for (const auto& line : cells) {
    for (std::size_t c = 0; c < line.size(); ++c) width[c] = std::max(width[c], line[c].size());
  }
  std::ostringstream out;
  out << table.method << ": " << table.rows.size() << " images, " << protocol_description(table.protocol) << "\n";
  for (std::size_t r = 0; r < cells.size(); ++r) {
    if (r == cells.size() - 1) {  // a rule above the mean
      std::size_t total = 0;
      for (std::size_t w : width) total += w + 2;
      out << std::string(total - 2, '-') << "\n";
    }
    for (std::size_t c = 0; c < cells[r].size(); ++c) {
      const std::string& text = cells[r][c];
      const std::string pad(width[c] - text.size(), ' ');
      out << (c == 0 ? text + pad : pad + text) << (c + 1 < cells[r].size() ? "  " : "\n");
    }
  }
  if (!table.incomplete.empty()) {
    out << "not evaluated (" << table.incomplete.size() << " images missing from a folder):\n";
    for (const IncompleteImage& entry : table.incomplete) {
      out << "  " << entry.image << ": missing from";
      for (const std::string& role : entry.missing_from) out << " " << role;
      out << "\n";
    }
  }
  return out.str();
}

/// CSV: header "image,<metrics...>,protocol", one line per image, then a "mean" line. The protocol column
/// makes every line self-describing. Stems that were not evaluated are not rows; see to_json.
inline std::string format_csv(const EvaluationTable& table, int precision = 6) {
  std::ostringstream out;
  out << "image";
  for (const std::string& name : table.metrics) out << "," << detail::csv_field(name);
  out << ",protocol\n";
  auto add = [&](const std::string& name, const MetricRow& row) {
    out << detail::csv_field(name);
    for (const auto& value : row.values) out << "," << detail::format_number(value.second, precision);
    out << "," << protocol_name(table.protocol) << "\n";
  };
  for (const ImageMetrics& row : table.rows) add(row.image, row.metrics);
  add("mean", table.mean);
  return out.str();
}

/// The whole table as JSON (NaN becomes null): method, protocol and its description, folders, metric names,
/// per-image values with their files, the mean, and the images that were not evaluated.
inline nlohmann::json to_json(const EvaluationTable& table) {
  auto values = [](const MetricRow& row) {
    nlohmann::json object = nlohmann::json::object();
    for (const auto& [name, value] : row.values) {
      object[name] = std::isnan(value) ? nlohmann::json(nullptr) : nlohmann::json(value);
    }
    return object;
  };
  nlohmann::json json;
  json["method"] = table.method;
  json["protocol"] = protocol_name(table.protocol);
  json["protocol_description"] = protocol_description(table.protocol);
  json["folders"] = {{"ir", table.ir_dir}, {"vi", table.vi_dir}, {"fused", table.fused_dir}};
  json["metrics"] = table.metrics;
  json["images"] = nlohmann::json::array();
  for (const ImageMetrics& row : table.rows) {
    json["images"].push_back({{"image", row.image},
                              {"files", {{"ir", row.ir_path}, {"vi", row.vi_path}, {"fused", row.fused_path}}},
                              {"values", values(row.metrics)}});
  }
  json["mean"] = values(table.mean);
  json["incomplete"] = nlohmann::json::array();
  for (const IncompleteImage& entry : table.incomplete) {
    json["incomplete"].push_back(
        {{"image", entry.image}, {"missing_from", entry.missing_from}, {"present", entry.present}});
  }
  return json;
}

inline std::string format_json(const EvaluationTable& table, int indent = 2) { return to_json(table).dump(indent); }

/// A Markdown table comparing the mean metrics of several methods (one row per method, the best value of each
/// column in bold; every metric here is better when larger), with a caption that states the protocol and the
/// number of image pairs. All tables must use the same protocol.
inline std::string format_markdown_comparison(const std::vector<EvaluationTable>& tables, int precision = 4,
                                              const std::string& dataset = "") {
  detail::check_comparable(tables, "format_markdown_comparison");
  const std::vector<std::string>& metrics = tables.front().metrics;
  std::vector<double> best(metrics.size(), -HUGE_VAL);
  for (const EvaluationTable& table : tables) {
    for (std::size_t m = 0; m < metrics.size(); ++m) {
      const double value = table.mean.values[m].second;
      if (!std::isnan(value)) best[m] = std::max(best[m], value);
    }
  }
  std::size_t min_pairs = tables.front().rows.size(), max_pairs = min_pairs;
  for (const EvaluationTable& table : tables) {
    min_pairs = std::min(min_pairs, table.rows.size());
    max_pairs = std::max(max_pairs, table.rows.size());
  }
  std::ostringstream out;
  out << "**Table.** Mean fusion metrics" << (dataset.empty() ? "" : " on " + dataset) << " over "
      << (min_pairs == max_pairs ? std::to_string(min_pairs)
                                 : std::to_string(min_pairs) + "-" + std::to_string(max_pairs))
      << " image pairs; " << protocol_description(tables.front().protocol)
      << ". Larger is better; the best value of each column is in bold.";
  if (min_pairs != max_pairs) out << " The methods were evaluated on different numbers of pairs (column n).";
  out << "\n\n| Method |";
  for (const std::string& name : metrics) out << " " << name << " |";
  out << " n |\n|:--|";
  for (std::size_t m = 0; m < metrics.size(); ++m) out << "--:|";
  out << "--:|\n";
  for (const EvaluationTable& table : tables) {
    out << "| " << detail::markdown_cell(table.method) << " |";
    for (std::size_t m = 0; m < metrics.size(); ++m) {
      const double value = table.mean.values[m].second;
      const std::string text = detail::format_number(value, precision);
      // Bold what prints the same as the best, so that ties at the shown precision are all marked.
      const bool is_best = !std::isnan(value) && text == detail::format_number(best[m], precision);
      out << " " << (is_best ? "**" + text + "**" : text) << " |";
    }
    out << " " << table.rows.size() << " |\n";
  }
  return out.str();
}

}  // namespace tdfusion::metrics
