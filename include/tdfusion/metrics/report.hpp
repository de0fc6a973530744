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
  if (!table.task.values.empty()) {
    out << "task metrics over the " << table.rows.size() << " images (" << table.task_description << "):";
    for (const MetricRow* row : {&table.task, &table.task_per_class}) {
      for (const auto& [name, value] : row->values) out << " " << name << " " << detail::format_number(value, precision);
    }
    out << "\n";
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

/// A row as a JSON object {metric: value} (NaN becomes null).
inline nlohmann::json to_json(const MetricRow& row) {
  nlohmann::json object = nlohmann::json::object();
  for (const auto& [name, value] : row.values) {
    object[name] = std::isnan(value) ? nlohmann::json(nullptr) : nlohmann::json(value);
  }
  return object;
}

/// The whole table as JSON (NaN becomes null): method, protocol and its description, folders, metric names,
/// per-image values with their files, the mean, and the images that were not evaluated.
inline nlohmann::json to_json(const EvaluationTable& table) {
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
                              {"values", to_json(row.metrics)}});
  }
  json["mean"] = to_json(table.mean);
  if (!table.task.values.empty()) {
    json["task"] = {{"description", table.task_description}, {"metrics", to_json(table.task)},
                    {"per_class", to_json(table.task_per_class)}};
  }
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
/// number of image pairs. All tables must use the same protocol. When every table carries the same task
/// metrics (evaluate_task), their columns follow the fusion metrics and the caption names the task network.
inline std::string format_markdown_comparison(const std::vector<EvaluationTable>& tables, int precision = 4,
                                              const std::string& dataset = "") {
  detail::check_comparable(tables, "format_markdown_comparison");
  bool with_task = !tables.front().task.values.empty();
  for (const EvaluationTable& table : tables) {
    with_task = with_task && table.task.values.size() == tables.front().task.values.size() &&
                table.task_description == tables.front().task_description;
  }
  auto row_of = [with_task](const EvaluationTable& table) {
    std::vector<std::pair<std::string, double>> values = table.mean.values;
    if (with_task) values.insert(values.end(), table.task.values.begin(), table.task.values.end());
    return values;
  };
  const std::vector<std::pair<std::string, double>> header = row_of(tables.front());
  std::vector<double> best(header.size(), -HUGE_VAL);
  for (const EvaluationTable& table : tables) {
    const auto values = row_of(table);
    for (std::size_t m = 0; m < values.size(); ++m) {
      if (!std::isnan(values[m].second)) best[m] = std::max(best[m], values[m].second);
    }
  }
  std::size_t min_pairs = tables.front().rows.size(), max_pairs = min_pairs;
  for (const EvaluationTable& table : tables) {
    min_pairs = std::min(min_pairs, table.rows.size());
    max_pairs = std::max(max_pairs, table.rows.size());
  }
  std::ostringstream out;
  out << "**Table.** Mean fusion metrics" << (with_task ? " and task metrics" : "")
      << (dataset.empty() ? "" : " on " + dataset) << " over "
      << (min_pairs == max_pairs ? std::to_string(min_pairs)
                                 : std::to_string(min_pairs) + "-" + std::to_string(max_pairs))
      << " image pairs; " << protocol_description(tables.front().protocol);
  if (with_task) out << "; task metrics: " << tables.front().task_description;
  out << ". Larger is better; the best value of each column is in bold.";
  if (min_pairs != max_pairs) out << " The methods were evaluated on different numbers of pairs (column n).";
  out << "\n\n| Method |";
  for (const auto& column : header) out << " " << detail::markdown_cell(column.first) << " |";
  out << " n |\n|:--|";
  for (std::size_t m = 0; m < header.size(); ++m) out << "--:|";
  out << "--:|\n";
  for (const EvaluationTable& table : tables) {
    out << "| " << detail::markdown_cell(table.method) << " |";
    const auto values = row_of(table);
    for (std::size_t m = 0; m < values.size(); ++m) {
      const double value = values[m].second;
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
