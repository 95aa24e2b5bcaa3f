// The libtorch side of autopar's TorchScript importer.
//
// Why a shim: a TorchScript archive holds its program as Python-like source (code/*.py) that
// only libtorch's compiler turns into a graph. This file loads the archive with
// torch::jit::load, inlines every submodule call of `forward`, resolves the module attribute
// reads (prim::GetAttr chains) to named parameters, buffers and constants, and describes the
// resulting straight-line graph as JSON for the Rust importer, which does all shape work,
// constant folding and op mapping. Tensor data is copied out on request only.
//
// Archives whose weight records were emptied (zero-length data/N, as in the corpus's graph-only
// .jit.pt files) still load: libtorch sizes each storage from data.pkl and leaves the missing
// bytes unallocated. Such tensors are reported as "stripped" and their data is never touched.
//
// Every entry point catches all C++ exceptions and reports them as a message.

#include <torch/script.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/csrc/jit/serialization/import_read.h>
#include <caffe2/serialize/inline_container.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

char* dup_string(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p != nullptr) {
    std::memcpy(p, s.data(), s.size());
    p[s.size()] = '\0';
  }
  return p;
}

void json_string(std::ostringstream& o, const std::string& s) {
  o << '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': o << "\\\""; break;
      case '\\': o << "\\\\"; break;
      case '\n': o << "\\n"; break;
      case '\r': o << "\\r"; break;
      case '\t': o << "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          o << buf;
        } else {
          o << c;
        }
    }
  }
  o << '"';
}

void json_double(std::ostringstream& o, double v) {
  if (std::isnan(v)) {
    o << "\"nan\"";
  } else if (std::isinf(v)) {
    o << (v > 0 ? "\"inf\"" : "\"-inf\"");
  } else {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.17g", v);
    o << buf;
    // keep floats recognisable as floats
    if (std::strpbrk(buf, ".eE") == nullptr) o << ".0";
  }
}

bool is_stripped(const at::Tensor& t) {
  return t.defined() && t.storage().nbytes() > 0 && t.storage().data() == nullptr;
}

struct Model {
  torch::jit::Module module;
  // Tensors referenced by the dump (parameters, buffers, tensor constants), by index.
  std::vector<at::Tensor> tensors;
  // Outputs of the last autopar_ts_forward, flattened.
  std::vector<at::Tensor> outputs;
};

at::ScalarType parse_dtype(const std::string& name) {
  static const std::map<std::string, at::ScalarType> names = {
      {"Float", at::kFloat}, {"Double", at::kDouble}, {"Half", at::kHalf},
      {"BFloat16", at::kBFloat16}, {"Long", at::kLong}, {"Int", at::kInt},
      {"Short", at::kShort}, {"Char", at::kChar}, {"Byte", at::kByte}, {"Bool", at::kBool}};
  auto it = names.find(name);
  if (it == names.end()) throw std::runtime_error("unknown dtype " + name);
  return it->second;
}

void flatten_outputs(const c10::IValue& v, std::vector<at::Tensor>& out) {
  if (v.isTensor()) {
    out.push_back(v.toTensor().contiguous());
  } else if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements()) flatten_outputs(e, out);
  } else if (v.isList()) {
    for (const auto& e : v.toListRef()) flatten_outputs(e, out);
  } else if (!v.isNone()) {
    throw std::runtime_error("forward returned a " + v.type()->str());
  }
}

struct TensorKey {
  const void* storage;
  int64_t offset;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  int dtype;
  bool operator<(const TensorKey& o) const {
    return std::tie(storage, offset, sizes, strides, dtype) <
           std::tie(o.storage, o.offset, o.sizes, o.strides, o.dtype);
  }
};

class Dumper {
 public:
  explicit Dumper(Model& m) : m_(m) {}

  // Index of a tensor in the table; one entry per distinct tensor (same storage, offset,
  // sizes, strides and dtype): tied parameters are listed once.
  size_t tensor_index(const at::Tensor& t, const std::string& name, const char* role) {
    TensorKey key{t.storage().unsafeGetStorageImpl(), t.storage_offset(),
                  t.sizes().vec(), t.strides().vec(), static_cast<int>(t.scalar_type())};
    auto it = index_.find(key);
    if (it != index_.end()) return it->second;
    size_t i = m_.tensors.size();
    m_.tensors.push_back(t);
    index_.emplace(key, i);
    if (i > 0) tensors_ << ',';
    tensors_ << "{\"name\":";
    json_string(tensors_, name);
    tensors_ << ",\"role\":\"" << role << "\",\"dtype\":";
    json_string(tensors_, c10::toString(t.scalar_type()));
    tensors_ << ",\"shape\":[";
    for (size_t d = 0; d < static_cast<size_t>(t.dim()); d++) {
      if (d > 0) tensors_ << ',';
      tensors_ << t.size(d);
    }
    tensors_ << "],\"stripped\":" << (is_stripped(t) ? "true" : "false") << '}';
    return i;
  }

  // An IValue as tagged JSON: {"t":"int","v":3}, {"t":"list","v":[...]}, ...
  void ivalue(std::ostringstream& o, const c10::IValue& v, const std::string& name) {
    if (v.isNone()) {
      o << "{\"t\":\"none\"}";
    } else if (v.isBool()) {
      o << "{\"t\":\"bool\",\"v\":" << (v.toBool() ? "true" : "false") << '}';
    } else if (v.isInt()) {
      o << "{\"t\":\"int\",\"v\":" << v.toInt() << '}';
    } else if (v.isDouble()) {
      o << "{\"t\":\"float\",\"v\":";
      json_double(o, v.toDouble());
      o << '}';
    } else if (v.isString()) {
      o << "{\"t\":\"str\",\"v\":";
      json_string(o, v.toStringRef());
      o << '}';
    } else if (v.isDevice()) {
      o << "{\"t\":\"device\",\"v\":";
      json_string(o, v.toDevice().str());
      o << '}';
    } else if (v.isTensor()) {
      o << "{\"t\":\"tensor\",\"v\":" << tensor_index(v.toTensor(), name, "constant") << '}';
    } else if (v.isList() || v.isTuple()) {
      std::vector<c10::IValue> elems;
      if (v.isList()) {
        for (const auto& e : v.toListRef()) elems.push_back(e);
      } else {
        for (const auto& e : v.toTupleRef().elements()) elems.push_back(e);
      }
      o << "{\"t\":\"" << (v.isList() ? "list" : "tuple") << "\",\"v\":[";
      for (size_t i = 0; i < elems.size(); i++) {
        if (i > 0) o << ',';
        ivalue(o, elems[i], name + "." + std::to_string(i));
      }
      o << "]}";
    } else {
      o << "{\"t\":\"unsupported\",\"v\":";
      json_string(o, v.type()->str());
      o << '}';
    }
  }

  std::string dump(const std::shared_ptr<torch::jit::Graph>& g,
                   const std::vector<std::tuple<std::string, std::vector<int64_t>>>& traced) {
    std::ostringstream o;
    auto inputs = g->inputs();
    if (inputs.empty()) throw std::runtime_error("forward has no self input");
    objects_[inputs[0]] = {m_.module._ivalue(), ""};

    o << "{\"inputs\":[";
    for (size_t i = 1; i < inputs.size(); i++) {
      if (i > 1) o << ',';
      o << "{\"id\":" << inputs[i]->unique() << ",\"name\":";
      json_string(o, inputs[i]->debugName());
      o << ",\"type\":";
      json_string(o, inputs[i]->type()->str());
      if (i - 1 < traced.size()) {
        o << ",\"traced\":{\"dtype\":";
        json_string(o, std::get<0>(traced[i - 1]));
        o << ",\"shape\":[";
        const auto& s = std::get<1>(traced[i - 1]);
        for (size_t d = 0; d < s.size(); d++) {
          if (d > 0) o << ',';
          o << s[d];
        }
        o << "]}";
      }
      o << '}';
    }
    o << "],\"nodes\":[";
    bool first = true;
    for (torch::jit::Node* n : g->nodes()) {
      std::ostringstream no;
      if (!node(no, n)) continue;
      if (!first) o << ',';
      first = false;
      o << no.str();
    }
    o << "],\"outputs\":[";
    for (size_t i = 0; i < g->outputs().size(); i++) {
      if (i > 0) o << ',';
      o << g->outputs()[i]->unique();
    }
    o << "],\"tensors\":[" << tensors_.str() << "]}";
    return o.str();
  }

 private:
  // Writes one node; false when the node is a module-attribute read that resolves to a
  // submodule (kept only in `objects_`).
  bool node(std::ostringstream& o, torch::jit::Node* n) {
    const std::string kind = n->kind().toQualString();
    if (n->kind() == c10::prim::GetAttr) {
      auto it = objects_.find(n->input(0));
      if (it != objects_.end()) {
        const auto& obj = it->second.first;
        const std::string& path = it->second.second;
        const std::string name = n->s(c10::attr::name);
        const std::string full = path.empty() ? name : path + "." + name;
        auto type = obj->type();
        auto slot = type->findAttributeSlot(name);
        if (!slot) throw std::runtime_error("module attribute " + full + " does not exist");
        c10::IValue v = obj->getSlot(*slot);
        if (v.isObject()) {
          objects_[n->output()] = {v.toObject(), full};
          return false;
        }
        const char* role = "constant";
        if (v.isTensor()) role = type->is_parameter(*slot) ? "param" : "buffer";
        o << "{\"kind\":\"prim::GetAttr\",\"outputs\":[" << n->output()->unique()
          << "],\"out_names\":[";
        json_string(o, n->output()->debugName());
        o << "],\"scope\":";
        json_string(o, path);
        o << ",\"value\":";
        if (v.isTensor()) {
          o << "{\"t\":\"tensor\",\"v\":" << tensor_index(v.toTensor(), full, role) << '}';
        } else {
          ivalue(o, v, full);
        }
        o << '}';
        return true;
      }
    }
    o << "{\"kind\":";
    json_string(o, kind);
    if (const c10::FunctionSchema* s = n->maybeSchema()) {
      std::ostringstream ss;
      ss << *s;
      o << ",\"schema\":";
      json_string(o, ss.str());
    }
    o << ",\"inputs\":[";
    for (size_t i = 0; i < n->inputs().size(); i++) {
      if (i > 0) o << ',';
      o << n->inputs()[i]->unique();
    }
    o << "],\"outputs\":[";
    for (size_t i = 0; i < n->outputs().size(); i++) {
      if (i > 0) o << ',';
      o << n->outputs()[i]->unique();
    }
    o << "],\"out_names\":[";
    for (size_t i = 0; i < n->outputs().size(); i++) {
      if (i > 0) o << ',';
      json_string(o, n->outputs()[i]->debugName());
    }
    o << "],\"out_types\":[";
    for (size_t i = 0; i < n->outputs().size(); i++) {
      if (i > 0) o << ',';
      json_string(o, n->outputs()[i]->type()->str());
    }
    o << "],\"scope\":";
    json_string(o, scope(n));
    if (!n->blocks().empty()) o << ",\"blocks\":" << n->blocks().size();
    auto range = n->sourceRange();
    if (auto orig = range.findSourceRangeThatGenerated()) range = *orig;
    if (auto src = range.file_line_col()) {
      std::string file = std::get<0>(*src);
      auto slash = file.find_last_of('/');
      if (slash != std::string::npos) file = file.substr(slash + 1);
      o << ",\"source\":";
      json_string(o, file + ":" + std::to_string(std::get<1>(*src)));
    }
    if (n->kind() == c10::prim::Constant) {
      o << ",\"value\":";
      if (n->outputs().size() == 1) {
        auto v = torch::jit::toIValue(n->output());
        if (v) {
          ivalue(o, *v, "constant " + n->output()->debugName());
        } else {
          o << "{\"t\":\"unsupported\",\"v\":\"constant\"}";
        }
      } else {
        o << "{\"t\":\"unsupported\",\"v\":\"constant\"}";
      }
    }
    o << '}';
    return true;
  }

  // The module path a node was inlined from (`transformer.h.0.attn`), from its call stack.
  static std::string scope(torch::jit::Node* n) {
    std::string path;
    if (auto cs = n->callstack()) {
      for (const auto& entry : (*cs)->vec()) {
        const auto& info = std::get<2>(entry);
        if (!info) continue;
        std::string name = info->instance_name();
        if (name.empty() || name == "self") continue;
        if (!path.empty()) path += '.';
        path += name;
      }
    }
    return path;
  }

  Model& m_;
  std::ostringstream tensors_;
  std::map<TensorKey, size_t> index_;
  std::unordered_map<const torch::jit::Value*,
                     std::pair<c10::intrusive_ptr<c10::ivalue::Object>, std::string>>
      objects_;
};

// dtype and shape of the example inputs torch.jit.trace stored (traced_inputs.pkl), if any.
std::vector<std::tuple<std::string, std::vector<int64_t>>> traced_inputs(const std::string& path) {
  std::vector<std::tuple<std::string, std::vector<int64_t>>> out;
  caffe2::serialize::PyTorchStreamReader reader(path);
  if (!reader.hasRecord("traced_inputs.pkl")) return out;
  c10::IValue v = torch::jit::readArchiveAndTensors(
      "traced_inputs", "", "traced_inputs/", std::nullopt, std::nullopt, c10::Device(c10::kCPU),
      reader);
  if (!v.isGenericDict()) return out;
  auto dict = v.toGenericDict();
  for (const auto& entry : dict) {
    if (!entry.key().isString() || entry.key().toStringRef() != "forward") continue;
    const c10::IValue& args = entry.value();
    std::vector<c10::IValue> elems;
    if (args.isList()) {
      for (const auto& e : args.toListRef()) elems.push_back(e);
    } else if (args.isTuple()) {
      for (const auto& e : args.toTupleRef().elements()) elems.push_back(e);
    }
    for (const auto& e : elems) {
      if (!e.isTensor()) {
        out.emplace_back("", std::vector<int64_t>{});
        continue;
      }
      const at::Tensor& t = e.toTensor();
      out.emplace_back(c10::toString(t.scalar_type()), t.sizes().vec());
    }
  }
  return out;
}

}  // namespace

extern "C" {

// Loads the archive at `path`. On success returns a handle and sets *json to the graph
// description (free with autopar_ts_free_string); on failure returns NULL and sets *err.
void* autopar_ts_load(const char* path, char** json, char** err) {
  *json = nullptr;
  *err = nullptr;
  try {
    auto model = std::make_unique<Model>();
    model->module = torch::jit::load(std::string(path), c10::Device(c10::kCPU));
    auto method = model->module.find_method("forward");
    if (!method) throw std::runtime_error("the module has no forward method");
    auto graph = method->graph()->copy();
    torch::jit::Inline(*graph);
    std::vector<std::tuple<std::string, std::vector<int64_t>>> traced;
    try {
      traced = traced_inputs(path);
    } catch (const std::exception&) {
      traced.clear();  // optional metadata: input shapes then come from the user
    }
    Dumper d(*model);
    *json = dup_string(d.dump(graph, traced));
    if (*json == nullptr) throw std::runtime_error("out of memory");
    return model.release();
  } catch (const std::exception& e) {
    *err = dup_string(e.what());
  } catch (...) {
    *err = dup_string("unknown C++ exception");
  }
  return nullptr;
}

// Copies tensor `index`'s elements (row-major, native byte order) into dst[0..len).
// Returns 0 on success; otherwise sets *err.
int autopar_ts_tensor_bytes(void* handle, size_t index, uint8_t* dst, size_t len, char** err) {
  *err = nullptr;
  try {
    auto* m = static_cast<Model*>(handle);
    if (index >= m->tensors.size()) throw std::runtime_error("tensor index out of range");
    const at::Tensor& t = m->tensors[index];
    if (is_stripped(t)) throw std::runtime_error("the tensor's data was stripped from the archive");
    at::Tensor c = t.contiguous();
    size_t n = c.numel() * c.element_size();
    if (n != len) {
      throw std::runtime_error("tensor has " + std::to_string(n) + " bytes, buffer " +
                               std::to_string(len));
    }
    if (n > 0) std::memcpy(dst, c.data_ptr(), n);
    return 0;
  } catch (const std::exception& e) {
    *err = dup_string(e.what());
  } catch (...) {
    *err = dup_string("unknown C++ exception");
  }
  return 1;
}

// Replaces the data of tensor `index` (a parameter or buffer: every module attribute holding
// it sees the change) with `len` bytes of its dtype and shape. Returns 0 on success.
int autopar_ts_set_tensor(void* handle, size_t index, const uint8_t* data, size_t len, char** err) {
  *err = nullptr;
  try {
    auto* m = static_cast<Model*>(handle);
    if (index >= m->tensors.size()) throw std::runtime_error("tensor index out of range");
    at::Tensor& t = m->tensors[index];
    at::Tensor src = at::empty(t.sizes(), at::TensorOptions().dtype(t.scalar_type()));
    if (static_cast<size_t>(src.nbytes()) != len) {
      throw std::runtime_error("tensor has " + std::to_string(src.nbytes()) + " bytes, given " +
                               std::to_string(len));
    }
    if (len > 0) std::memcpy(src.data_ptr(), data, len);
    torch::NoGradGuard no_grad;
    t.set_(src);
    return 0;
  } catch (const std::exception& e) {
    *err = dup_string(e.what());
  } catch (...) {
    *err = dup_string("unknown C++ exception");
  }
  return 1;
}

// Runs forward on `n` tensor inputs (c10 dtype names, shapes, bytes). On success returns a
// JSON list of the flattened outputs' dtypes and shapes (free with autopar_ts_free_string);
// their bytes are then read with autopar_ts_output_bytes. On failure returns NULL, sets *err.
char* autopar_ts_forward(void* handle, size_t n, const char* const* dtypes,
                         const int64_t* const* shapes, const size_t* ranks,
                         const uint8_t* const* data, const size_t* lens, char** err) {
  *err = nullptr;
  try {
    auto* m = static_cast<Model*>(handle);
    std::vector<c10::IValue> inputs;
    for (size_t i = 0; i < n; i++) {
      std::vector<int64_t> shape(shapes[i], shapes[i] + ranks[i]);
      at::Tensor t = at::empty(shape, at::TensorOptions().dtype(parse_dtype(dtypes[i])));
      if (static_cast<size_t>(t.nbytes()) != lens[i]) throw std::runtime_error("input size mismatch");
      if (lens[i] > 0) std::memcpy(t.data_ptr(), data[i], lens[i]);
      inputs.emplace_back(t);
    }
    torch::NoGradGuard no_grad;
    c10::IValue out = m->module.forward(inputs);
    m->outputs.clear();
    flatten_outputs(out, m->outputs);
    std::ostringstream o;
    o << '[';
    for (size_t i = 0; i < m->outputs.size(); i++) {
      const at::Tensor& t = m->outputs[i];
      if (i > 0) o << ',';
      o << "{\"dtype\":";
      json_string(o, c10::toString(t.scalar_type()));
      o << ",\"shape\":[";
      for (int64_t d = 0; d < t.dim(); d++) {
        if (d > 0) o << ',';
        o << t.size(d);
      }
      o << "]}";
    }
    o << ']';
    return dup_string(o.str());
  } catch (const std::exception& e) {
    *err = dup_string(e.what());
  } catch (...) {
    *err = dup_string("unknown C++ exception");
  }
  return nullptr;
}

// Copies output `index` of the last forward into dst[0..len). Returns 0 on success.
int autopar_ts_output_bytes(void* handle, size_t index, uint8_t* dst, size_t len, char** err) {
  *err = nullptr;
  try {
    auto* m = static_cast<Model*>(handle);
    if (index >= m->outputs.size()) throw std::runtime_error("output index out of range");
    const at::Tensor& t = m->outputs[index];
    if (static_cast<size_t>(t.nbytes()) != len) throw std::runtime_error("output size mismatch");
    if (len > 0) std::memcpy(dst, t.data_ptr(), len);
    return 0;
  } catch (const std::exception& e) {
    *err = dup_string(e.what());
  } catch (...) {
    *err = dup_string("unknown C++ exception");
  }
  return 1;
}

void autopar_ts_free(void* handle) { delete static_cast<Model*>(handle); }

void autopar_ts_free_string(char* s) { std::free(s); }

}  // extern "C"
