// joulepool's compiled ext_proc front end: a C++ gRPC server (grpc++ callback API)
// inside the router process, holding the Envoy ext_proc v3 streams of the GIE endpoint
// picker and calling Python once per decision and once per response.
//
// Contract (the Python side is joulepool/router/epp_native.py; the protocol itself
// and the reasons are in docs/gateway.md):
//
// * gRPC's threads parse the gateway's messages, keep each stream's state (headers,
//   body, subset hint, processing modes) and answer every message that needs no
//   decision ("continue", the full-duplex echo) without Python.
// * What needs Python is queued as a job; an eventfd (fileno()) wakes the router's
//   event loop, whose reader calls drain(): the jobs run there, with the GIL, in the
//   order they were queued, serialised with everything else the router does on its
//   loop (the core router is not thread-safe). gRPC's threads never take the GIL.
// * Jobs: pick (request over: bridge.pick(headers, body, subset) -> (exchange,
//   "a:p,b:p,...") or (None, (status, message, json_body)) or (None, None) on an
//   internal error); response (exchange.response(status | None, content_type,
//   chunk | None, end)); served (exchange.served(address)); close (exchange.close()).
//   A response with end=True closes the exchange itself.
// * Without a bridge (None) the server decides nothing: every message is answered
//   "continue" (the benchmark's do-nothing floor).
// * grpc++'s default health service (grpc.health.v1), statuses set by set_serving().

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "envoy/service/ext_proc/v3/external_processor.grpc.pb.h"

namespace {

namespace ep = envoy::service::ext_proc::v3;
namespace cfg = envoy::config::core::v3;
using ProcessingMode = envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
using Headers = std::vector<std::pair<std::string, std::string>>;

// The Kubernetes contract's names (joulepool.api.contract), given by Python.
struct Names {
  std::string destination_header;  // x-gateway-destination-endpoint
  std::string lb_namespace;        // envoy.lb
  std::string subset_namespace;    // envoy.lb.subset_hint
  std::string subset_key;          // x-gateway-destination-endpoint-subset
  std::string served_key;          // x-gateway-destination-endpoint-served
};

class Stream;

enum class JobKind { kPick, kResponse, kServed, kClose };

struct Job {
  JobKind kind;
  Stream* stream = nullptr;      // kPick: the stream waiting for its answer
  PyObject* exchange = nullptr;  // the others: the stream's Python exchange
  bool owns_exchange = false;    // the job drops the stream's reference when done
  Headers headers;               // kPick
  std::string data;              // kPick: the request body; kResponse: the chunk;
                                 // kServed: the address
  bool headers_only = false;     // kPick
  bool has_subset = false;       // kPick
  std::vector<std::string> subset;
  bool has_status = false;       // kResponse: the response's status not yet reported
  std::string status, content_type;
  bool has_chunk = false, end = false;
};

class Core;

bool IsSpace(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

std::string Strip(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && IsSpace(s[a])) ++a;
  while (b > a && IsSpace(s[b - 1])) --b;
  return s.substr(a, b - a);
}

std::vector<std::string> SplitComma(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    size_t comma = s.find(',', start);
    std::string part = Strip(s.substr(start, comma == std::string::npos ? comma : comma - start));
    if (!part.empty()) out.push_back(part);
    if (comma == std::string::npos) return out;
    start = comma + 1;
  }
}

// Lower-cased names to values (raw_value when the gateway sends bytes), the last of a
// repeated name winning, as epp.header_map.
Headers HeaderList(const cfg::HeaderMap& map) {
  Headers out;
  out.reserve(map.headers_size());
  for (const auto& h : map.headers()) {
    std::string key = h.key();
    for (auto& c : key) c = static_cast<char>(tolower(static_cast<unsigned char>(c)));
    out.emplace_back(std::move(key), h.raw_value().empty() ? h.value() : h.raw_value());
  }
  return out;
}

const std::string* Find(const Headers& headers, const char* key) {
  const std::string* found = nullptr;
  for (const auto& kv : headers)
    if (kv.first == key) found = &kv.second;
  return found;
}

// A status the Python side would certainly take as a usable response (digits, < 400):
// its report can wait for the response's first body chunk or its end.
bool PlainlyUsable(const std::string& status) {
  if (status.empty() || status.size() > 9) return false;
  for (char c : status)
    if (c < '0' || c > '9') return false;
  return std::stol(status) < 400;
}

class Core {
 public:
  Core(Names names, PyObject* bridge) : names_(std::move(names)), bridge_(bridge) {
    efd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  }
  ~Core() {
    if (efd_ >= 0) close(efd_);
  }
  const Names& names() const { return names_; }
  bool floor() const { return bridge_ == nullptr; }
  int fd() const { return efd_; }

  // Any thread: queue a job for the event loop and wake it (once per batch).
  void Post(Job job);
  // The event loop (GIL held): run the jobs queued so far.
  void Drain();
  // GIL held, the server going away for good (no drain to come): the picks queued now
  // or later fail at once (Python is not asked: nothing would run them), the rest run.
  void FailPending();

 private:
  void RunPick(Job& job);
  void RunExchangeCall(Job& job);

  Names names_;
  PyObject* bridge_;  // borrowed: the Python Server object keeps it alive
  int efd_ = -1;
  std::mutex mu_;
  std::deque<Job> queue_;
  bool signalled_ = false;
  bool stopping_ = false;  // set by FailPending: picks are no longer queued
};

// One ext_proc stream = one HTTP request. Its state is touched by one thread at a time:
// gRPC's reaction to the one operation in flight, or the event loop running the
// stream's pick job (posted as the reaction's last act; the answer's StartWrite is the
// job's last touch).
class Stream final : public grpc::ServerBidiReactor<ep::ProcessingRequest, ep::ProcessingResponse> {
 public:
  explicit Stream(Core* core) : core_(core) { StartRead(&req_); }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the gateway half-closed, or the stream broke
      End(grpc::Status::OK);
      return;
    }
    NoteMetadata();
    switch (req_.request_case()) {
      case ep::ProcessingRequest::kRequestHeaders: OnRequestHeaders(); break;
      case ep::ProcessingRequest::kRequestBody: OnRequestBody(); break;
      case ep::ProcessingRequest::kResponseHeaders: OnResponseHeaders(); break;
      case ep::ProcessingRequest::kResponseBody: OnResponseBody(); break;
      case ep::ProcessingRequest::kRequestTrailers:
        Reply().mutable_request_trailers();
        Send();
        break;
      case ep::ProcessingRequest::kResponseTrailers:
        ResponseCall(nullptr, true);
        over_ = true;
        Reply().mutable_response_trailers();
        Send();
        break;
      default:  // nothing the picker answers
        StartRead(&req_);
    }
  }

  void OnWriteDone(bool ok) override {
    out_.pop_front();
    if (!ok) {
      End(grpc::Status::OK);
    } else if (!out_.empty()) {
      StartWrite(&out_.front());
    } else if (over_) {
      End(grpc::Status::OK);
    } else {
      StartRead(&req_);
    }
  }

  void OnDone() override { delete this; }

  // The event loop, GIL held: the pick's outcome (see the file's contract).
  void Answer(PyObject* exchange, const std::string* destination, long status,
              const std::string& message, const std::string& body, bool headers_only) {
    exchange_ = exchange;
    if (destination == nullptr && status == 0) {  // the Python side failed: say so
      End(grpc::Status(grpc::StatusCode::UNKNOWN, "the endpoint picker failed"));
      return;
    }
    if (destination == nullptr) {
      Immediate(status, message, body);
    } else if (headers_only || duplex_request_) {
      Destination(*destination, Reply().mutable_request_headers()->mutable_response());
      if (!headers_only) {  // full duplex: the held body goes on, unchanged
        auto* streamed = Reply().mutable_request_body()->mutable_response()
                             ->mutable_body_mutation()->mutable_streamed_response();
        streamed->set_body(std::move(body_));
        streamed->set_end_of_stream(true);
      }
    } else {
      Destination(*destination, Reply().mutable_request_body()->mutable_response());
    }
    Send();
  }

  // The server is going away before the pick ran.
  void Abort() { End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the endpoint picker stopped")); }

 private:
  ep::ProcessingResponse& Reply() {
    out_.emplace_back();
    return out_.back();
  }

  // Write the replies queued by this message (first one; OnWriteDone the rest), or
  // read on when there is none.
  void Send() {
    if (out_.empty()) {
      if (over_) End(grpc::Status::OK); else StartRead(&req_);
      return;
    }
    StartWrite(&out_.front());
  }

  void End(const grpc::Status& status) {
    if (exchange_ != nullptr) {
      Job job{JobKind::kClose};
      job.exchange = exchange_;
      job.owns_exchange = true;
      exchange_ = nullptr;
      core_->Post(std::move(job));
    }
    Finish(status);
  }

  void NoteMetadata() {
    if (req_.has_protocol_config()) {
      const auto& pc = req_.protocol_config();
      duplex_request_ = pc.request_body_mode() == ProcessingMode::FULL_DUPLEX_STREAMED;
      duplex_response_ = pc.response_body_mode() == ProcessingMode::FULL_DUPLEX_STREAMED;
    }
    if (!req_.has_metadata_context()) return;
    const auto& md = req_.metadata_context().filter_metadata();
    const Names& names = core_->names();
    auto ns = md.find(names.subset_namespace);
    if (ns != md.end()) {
      auto f = ns->second.fields().find(names.subset_key);
      if (f != ns->second.fields().end()) ReadSubset(f->second);
    }
    ns = md.find(names.lb_namespace);
    if (ns == md.end()) return;
    auto f = ns->second.fields().find(names.served_key);
    if (f == ns->second.fields().end() || f->second.string_value().empty()) return;
    const std::string& value = f->second.string_value();
    std::string served = Strip(value.substr(0, value.find(',')));
    if (!served.empty() && exchange_ != nullptr) {
      Job job{JobKind::kServed};
      job.exchange = exchange_;
      job.data = std::move(served);
      core_->Post(std::move(job));
    }
  }

  void ReadSubset(const google::protobuf::Value& value) {
    has_subset_ = true;
    subset_.clear();
    if (value.kind_case() == google::protobuf::Value::kListValue) {
      for (const auto& v : value.list_value().values())
        if (v.kind_case() == google::protobuf::Value::kStringValue && !v.string_value().empty())
          subset_.push_back(v.string_value());
    } else if (value.kind_case() == google::protobuf::Value::kStringValue) {
      subset_ = SplitComma(value.string_value());  // tolerate a comma-separated string
    }
  }

  void OnRequestHeaders() {
    auto* h = req_.mutable_request_headers();
    headers_ = HeaderList(h->headers());
    if (h->end_of_stream()) {
      Pick(true);
    } else if (!duplex_request_) {
      Reply().mutable_request_headers();
      Send();
    } else {
      StartRead(&req_);
    }
  }

  void OnRequestBody() {
    auto* b = req_.mutable_request_body();
    body_.append(b->body());
    if (b->end_of_stream()) {
      Pick(false);
    } else if (!duplex_request_) {
      Reply().mutable_request_body();
      Send();
    } else {
      StartRead(&req_);
    }
  }

  void Pick(bool headers_only) {
    if (core_->floor()) {  // decide nothing: "continue"
      if (headers_only) Reply().mutable_request_headers(); else Reply().mutable_request_body();
      Send();
      return;
    }
    Job job{JobKind::kPick};
    job.stream = this;
    job.headers = std::move(headers_);
    job.data = body_;
    job.headers_only = headers_only;
    job.has_subset = has_subset_;
    job.subset = subset_;
    core_->Post(std::move(job));  // the last touch until Answer
  }

  void OnResponseHeaders() {
    const auto& h = req_.response_headers();
    Headers headers = HeaderList(h.headers());
    const std::string* status = Find(headers, ":status");
    const std::string* type = Find(headers, "content-type");
    status_ = status ? *status : "200";
    content_type_ = type ? *type : "";
    status_pending_ = true;
    // an error is reported now (the ledger entry goes at once); a usable response
    // with its first chunk or its end
    if (h.end_of_stream() || !PlainlyUsable(status_)) ResponseCall(nullptr, h.end_of_stream());
    if (h.end_of_stream()) over_ = true;
    Reply().mutable_response_headers();
    Send();
  }

  void OnResponseBody() {
    auto* b = req_.mutable_response_body();
    bool end = b->end_of_stream();
    ResponseCall(b->mutable_body(), end);
    if (end) over_ = true;
    if (duplex_response_) {
      auto* streamed = Reply().mutable_response_body()->mutable_response()
                           ->mutable_body_mutation()->mutable_streamed_response();
      streamed->set_body(b->body());
      streamed->set_end_of_stream(end);
    } else {
      Reply().mutable_response_body();
    }
    Send();
  }

  // Tell the exchange about the response (nothing to tell without one). ``end``: the
  // exchange is over; the job then drops the stream's reference.
  void ResponseCall(const std::string* chunk, bool end) {
    if (exchange_ == nullptr) return;
    Job job{JobKind::kResponse};
    job.exchange = exchange_;
    if (status_pending_) {
      job.has_status = true;
      job.status = status_;
      job.content_type = content_type_;
      status_pending_ = false;
    }
    if (chunk != nullptr) {
      job.has_chunk = true;
      job.data = *chunk;
    }
    job.end = end;
    if (end) {
      job.owns_exchange = true;
      exchange_ = nullptr;
    }
    core_->Post(std::move(job));
  }

  void Immediate(long status, const std::string& message, const std::string& body) {
    over_ = true;
    auto* imm = Reply().mutable_immediate_response();
    imm->mutable_status()->set_code(static_cast<envoy::type::v3::StatusCode>(status));
    auto* opt = imm->mutable_headers()->add_set_headers();
    opt->mutable_header()->set_key("content-type");
    opt->mutable_header()->set_raw_value("application/json");
    imm->set_body(body);
    imm->set_details(message);
  }

  void Destination(const std::string& value, ep::CommonResponse* common) {
    auto* opt = common->mutable_header_mutation()->add_set_headers();
    opt->mutable_header()->set_key(core_->names().destination_header);
    opt->mutable_header()->set_raw_value(value);
    opt->set_append_action(cfg::HeaderValueOption::OVERWRITE_IF_EXISTS_OR_ADD);
    auto& lb = (*out_.back().mutable_dynamic_metadata()->mutable_fields())[
        core_->names().lb_namespace];
    (*lb.mutable_struct_value()->mutable_fields())[core_->names().destination_header]
        .set_string_value(value);
  }

  Core* core_;
  ep::ProcessingRequest req_;
  std::deque<ep::ProcessingResponse> out_;
  Headers headers_;
  std::string body_;
  bool has_subset_ = false;
  std::vector<std::string> subset_;
  bool duplex_request_ = false, duplex_response_ = false;
  std::string status_, content_type_;
  bool status_pending_ = false;
  bool over_ = false;
  PyObject* exchange_ = nullptr;  // owned reference, released by a job (GIL)
};

class Service final : public ep::ExternalProcessor::CallbackService {
 public:
  explicit Service(Core* core) : core_(core) {}
  grpc::ServerBidiReactor<ep::ProcessingRequest, ep::ProcessingResponse>* Process(
      grpc::CallbackServerContext*) override {
    return new Stream(core_);
  }

 private:
  Core* core_;
};

PyObject* Text(const std::string& s) {
  return PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
}

PyObject* HeaderDict(const Headers& headers) {
  PyObject* dict = PyDict_New();
  if (dict == nullptr) return nullptr;
  for (const auto& kv : headers) {
    PyObject* k = Text(kv.first);
    PyObject* v = Text(kv.second);
    if (k == nullptr || v == nullptr || PyDict_SetItem(dict, k, v) < 0) {
      Py_XDECREF(k);
      Py_XDECREF(v);
      Py_DECREF(dict);
      return nullptr;
    }
    Py_DECREF(k);
    Py_DECREF(v);
  }
  return dict;
}

PyObject* SubsetSet(const Job& job) {
  if (!job.has_subset) Py_RETURN_NONE;
  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
  for (const auto& a : job.subset) {
    PyObject* s = Text(a);
    if (s == nullptr || PyList_Append(list, s) < 0) {
      Py_XDECREF(s);
      Py_DECREF(list);
      return nullptr;
    }
    Py_DECREF(s);
  }
  PyObject* set = PyFrozenSet_New(list);
  Py_DECREF(list);
  return set;
}

void Core::RunPick(Job& job) {
  PyObject* headers = HeaderDict(job.headers);
  PyObject* body = PyBytes_FromStringAndSize(job.data.data(),
                                             static_cast<Py_ssize_t>(job.data.size()));
  PyObject* subset = SubsetSet(job);
  PyObject* result = nullptr;
  if (headers && body && subset)
    result = PyObject_CallMethod(bridge_, "pick", "OOO", headers, body, subset);
  Py_XDECREF(headers);
  Py_XDECREF(body);
  Py_XDECREF(subset);
  PyObject* exchange = nullptr;
  PyObject* answer = nullptr;
  if (result == nullptr || !PyTuple_Check(result) || PyTuple_GET_SIZE(result) != 2) {
    if (result == nullptr) PyErr_WriteUnraisable(bridge_);
    Py_XDECREF(result);
    job.stream->Answer(nullptr, nullptr, 0, "", "", job.headers_only);
    return;
  }
  exchange = PyTuple_GET_ITEM(result, 0);
  answer = PyTuple_GET_ITEM(result, 1);
  Py_ssize_t n = 0;
  if (exchange != Py_None && PyUnicode_Check(answer)) {
    const char* value = PyUnicode_AsUTF8AndSize(answer, &n);
    std::string dest(value, static_cast<size_t>(n));
    Py_INCREF(exchange);
    Py_DECREF(result);
    job.stream->Answer(exchange, &dest, 0, "", "", job.headers_only);
    return;
  }
  long status = 0;
  const char *message = nullptr, *body_data = nullptr;
  Py_ssize_t message_n = 0, body_n = 0;
  if (exchange == Py_None && PyTuple_Check(answer) &&
      PyArg_ParseTuple(answer, "ls#y#", &status, &message, &message_n, &body_data, &body_n)) {
    std::string m(message, static_cast<size_t>(message_n));
    std::string b(body_data, static_cast<size_t>(body_n));
    Py_DECREF(result);
    job.stream->Answer(nullptr, nullptr, status, m, b, job.headers_only);
    return;
  }
  if (PyErr_Occurred()) PyErr_WriteUnraisable(bridge_);
  Py_DECREF(result);
  job.stream->Answer(nullptr, nullptr, 0, "", "", job.headers_only);
}

void Core::RunExchangeCall(Job& job) {
  PyObject* result = nullptr;
  if (job.kind == JobKind::kClose) {
    result = PyObject_CallMethod(job.exchange, "close", nullptr);
  } else if (job.kind == JobKind::kServed) {
    PyObject* address = Text(job.data);
    if (address) result = PyObject_CallMethod(job.exchange, "served", "O", address);
    Py_XDECREF(address);
  } else {
    PyObject* status = job.has_status ? Text(job.status) : (Py_INCREF(Py_None), Py_None);
    PyObject* type = Text(job.content_type);
    PyObject* chunk = job.has_chunk
        ? PyBytes_FromStringAndSize(job.data.data(), static_cast<Py_ssize_t>(job.data.size()))
        : (Py_INCREF(Py_None), Py_None);
    if (status && type && chunk)
      result = PyObject_CallMethod(job.exchange, "response", "OOOO", status, type, chunk,
                                   job.end ? Py_True : Py_False);
    Py_XDECREF(status);
    Py_XDECREF(type);
    Py_XDECREF(chunk);
  }
  if (result == nullptr) PyErr_WriteUnraisable(job.exchange);
  Py_XDECREF(result);
  if (job.owns_exchange) Py_DECREF(job.exchange);
}

void Core::Post(Job job) {
  Stream* refused = nullptr;
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && job.kind == JobKind::kPick) {
      refused = job.stream;
    } else {
      queue_.push_back(std::move(job));
      wake = !signalled_;
      signalled_ = true;
    }
  }
  if (refused != nullptr) {
    refused->Abort();
  } else if (wake) {
    uint64_t one = 1;
    ssize_t n = write(efd_, &one, sizeof one);
    (void)n;
  }
}

void Core::Drain() {
  uint64_t count;
  ssize_t n = read(efd_, &count, sizeof count);
  (void)n;
  std::deque<Job> jobs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    jobs.swap(queue_);
    signalled_ = false;
  }
  for (auto& job : jobs) {
    if (job.kind == JobKind::kPick) RunPick(job); else RunExchangeCall(job);
  }
}

void Core::FailPending() {
  std::deque<Job> jobs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    jobs.swap(queue_);
    signalled_ = false;
  }
  for (auto& job : jobs) {
    if (job.kind == JobKind::kPick) job.stream->Abort(); else RunExchangeCall(job);
  }
}

// --------------------------------------------------------------------------
// The Python type: _eppnative.Server
// --------------------------------------------------------------------------
struct ServerObject {
  PyObject_HEAD
  PyObject* bridge;
  Core* core;
  Service* service;
  grpc::Server* server;
  int port;
  bool shut_down;
};

void StopServer(ServerObject* self, double grace_s) {
  if (self->server == nullptr || self->shut_down) return;
  self->shut_down = true;
  auto deadline = std::chrono::system_clock::now() +
                  std::chrono::microseconds(static_cast<long long>(grace_s * 1e6));
  grpc::Server* server = self->server;
  Py_BEGIN_ALLOW_THREADS
  server->Shutdown(deadline);
  Py_END_ALLOW_THREADS
}

int Server_init(ServerObject* self, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"address", "bridge", "destination_header", "lb_namespace",
                             "subset_namespace", "subset_key", "served_key", nullptr};
  const char *address, *dest, *lb, *subset_ns, *subset_key, *served;
  PyObject* bridge;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sOsssss", const_cast<char**>(kw), &address,
                                   &bridge, &dest, &lb, &subset_ns, &subset_key, &served))
    return -1;
  if (self->core != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "Server already initialised");
    return -1;
  }
  Py_INCREF(bridge);
  self->bridge = bridge;
  self->core = new Core(Names{dest, lb, subset_ns, subset_key, served},
                        bridge == Py_None ? nullptr : bridge);
  if (self->core->fd() < 0) {
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
  }
  self->service = new Service(self->core);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  builder.AddChannelArgument("grpc.enable_channelz", 0);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &self->port);
  builder.RegisterService(self->service);
  std::string where(address);
  std::unique_ptr<grpc::Server> server;
  Py_BEGIN_ALLOW_THREADS
  server = builder.BuildAndStart();
  Py_END_ALLOW_THREADS
  if (!server || self->port == 0) {
    PyErr_Format(PyExc_OSError, "cannot listen on %s (gRPC)", where.c_str());
    return -1;
  }
  // grpc++'s default health service starts with "" SERVING: not before Python says
  server->GetHealthCheckService()->SetServingStatus("", false);
  self->server = server.release();
  return 0;
}

void Server_dealloc(ServerObject* self) {
  if (self->server != nullptr) {
    self->core->FailPending();  // no loop will drain any more
    StopServer(self, 0.0);
    self->core->FailPending();
    delete self->server;
  }
  delete self->service;
  delete self->core;
  Py_XDECREF(self->bridge);
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

PyObject* Server_fileno(ServerObject* self, PyObject*) { return PyLong_FromLong(self->core->fd()); }

PyObject* Server_drain(ServerObject* self, PyObject*) {
  self->core->Drain();
  Py_RETURN_NONE;
}

PyObject* Server_shutdown(ServerObject* self, PyObject* args) {
  double grace = 0.0;
  if (!PyArg_ParseTuple(args, "d", &grace)) return nullptr;
  StopServer(self, grace);
  Py_RETURN_NONE;
}

PyObject* Server_close(ServerObject* self, PyObject*) {
  if (self->server != nullptr && !self->shut_down) {
    self->core->FailPending();
    StopServer(self, 0.0);
  }
  self->core->FailPending();
  Py_RETURN_NONE;
}

PyObject* Server_set_serving(ServerObject* self, PyObject* args) {
  const char* name;
  int serving;
  if (!PyArg_ParseTuple(args, "sp", &name, &serving)) return nullptr;
  if (self->server == nullptr || self->shut_down) Py_RETURN_NONE;
  self->server->GetHealthCheckService()->SetServingStatus(name, serving != 0);
  Py_RETURN_NONE;
}

PyObject* Server_port(ServerObject* self, void*) { return PyLong_FromLong(self->port); }

PyMethodDef server_methods[] = {
    {"fileno", reinterpret_cast<PyCFunction>(Server_fileno), METH_NOARGS,
     "fileno() -> int: the eventfd that becomes readable when drain() has jobs to run"},
    {"drain", reinterpret_cast<PyCFunction>(Server_drain), METH_NOARGS,
     "drain() -> None: run the queued jobs (on the router's event loop)"},
    {"shutdown", reinterpret_cast<PyCFunction>(Server_shutdown), METH_VARARGS,
     "shutdown(grace_s) -> None: stop accepting streams, cancel those left after grace_s "
     "seconds; blocks without the GIL (keep draining meanwhile)"},
    {"close", reinterpret_cast<PyCFunction>(Server_close), METH_NOARGS,
     "close() -> None: after shutdown, run what is left (picks still queued fail)"},
    {"set_serving", reinterpret_cast<PyCFunction>(Server_set_serving), METH_VARARGS,
     "set_serving(service, serving) -> None: grpc.health.v1 status of a service name"},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef server_getset[] = {
    {"port", reinterpret_cast<getter>(Server_port), nullptr, "the bound TCP port", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyTypeObject ServerType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_eppnative",
                          "joulepool's compiled ext_proc front end (native/eppnative.cc)", -1,
                          nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__eppnative(void) {
  ServerType.tp_name = "joulepool.router._eppnative.Server";
  ServerType.tp_basicsize = sizeof(ServerObject);
  ServerType.tp_flags = Py_TPFLAGS_DEFAULT;
  ServerType.tp_doc =
      "Server(address, bridge, destination_header, lb_namespace, subset_namespace, "
      "subset_key, served_key): the ext_proc gRPC server, started";
  ServerType.tp_new = PyType_GenericNew;
  ServerType.tp_init = reinterpret_cast<initproc>(Server_init);
  ServerType.tp_dealloc = reinterpret_cast<destructor>(Server_dealloc);
  ServerType.tp_methods = server_methods;
  ServerType.tp_getset = server_getset;
  if (PyType_Ready(&ServerType) < 0) return nullptr;
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  Py_INCREF(&ServerType);
  if (PyModule_AddObject(m, "Server", reinterpret_cast<PyObject*>(&ServerType)) < 0) {
    Py_DECREF(&ServerType);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
