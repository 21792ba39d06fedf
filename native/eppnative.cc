// joulepool's compiled ext_proc front end: a C++ gRPC server (grpc++'s asynchronous
// API, one completion-queue thread) inside the router process, holding the Envoy
// ext_proc v3 streams of the GIE endpoint picker and calling Python once per decision
// and once per response.
//
// Contract (the Python side is joulepool/router/epp_native.py; the protocol itself
// and the reasons are in docs/gateway.md):
//
// * The completion-queue thread parses the gateway's messages, keeps each stream's
//   state (headers, body, subset hint, processing modes) and answers every message
//   that needs no decision ("continue", the full-duplex echo) without Python.
// * What needs Python is queued as a job; an eventfd (fileno()) wakes the router's
//   event loop, whose reader calls drain(): the jobs run there, with the GIL, in the
//   order they were queued, serialised with everything else the router does on its
//   loop (the core router is not thread-safe). gRPC's threads never take the GIL.
// * Server-side latency, counted here with no Python per request (latency()):
//   decision = the request's end read by the completion-queue thread -> its answer
//   handed to gRPC; queue = the pick waiting for the event loop; pick = Python's call.
// * One thread drives every stream (grpc++'s callback API hands each completion to
//   one of two threads instead, and costs more CPU per exchange: docs/gateway.md).
//   Woken while the event loop runs this server's jobs, it handles the completions at
//   hand, then stands aside until the loop is done (at most kLoopWaitNs) and takes
//   every completion that came meanwhile in one go: the loop's Python is not
//   preempted by it for each message of another stream (ServeCompletions).
// * Jobs: pick (request over: bridge.pick(headers, body, subset) -> (exchange,
//   "a:p,b:p,...") or (None, (status, message, json_body)) or (None, None) on an
//   internal error); response (exchange.response(status | None, content_type,
//   chunk | None, end)); served (exchange.served(address)); close (exchange.close()).
//   A response with end=True closes the exchange itself.
// * A job that throws (a C++ exception: std::bad_alloc) fails alone: a pick's stream
//   gets the answer of a failed pick (gRPC UNKNOWN, as when Python's pick raised), the
//   job's Python references are released, and the rest of the batch runs; drain() then
//   raises the first such failure (MemoryError or RuntimeError) for the loop to log.
// * Without a bridge (None) the server decides nothing: every message is answered
//   "continue" (the benchmark's do-nothing floor).
// * grpc.health.v1 Check and Watch on the same thread (grpc++'s default health service
//   is written on the callback API, whose threads would poll beside this one), statuses
//   set by set_serving(); a name never set is NOT_FOUND (Check) or SERVICE_UNKNOWN
//   (Watch), as grpcio's health servicer answers.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <grpcpp/grpcpp.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <thread>
#include <chrono>
#include <deque>
#include <exception>
#include <map>
#include <set>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "envoy/service/ext_proc/v3/external_processor.grpc.pb.h"
#include "grpc_health/v1/health.grpc.pb.h"

namespace {

namespace ep = envoy::service::ext_proc::v3;
namespace hv1 = grpc::health::v1;
using ServingStatus = hv1::HealthCheckResponse::ServingStatus;
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
class WatchCall;

// Monotonic nanoseconds (the clock of every latency recorded here).
int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A latency histogram with fixed upper bounds (seconds, given by Python: the
// Prometheus buckets), counted with relaxed atomics by whichever thread observes and
// read by Python at scrape time: nothing per exchange crosses into Python.
class LatencyHistogram {
 public:
  void SetBounds(std::vector<double> bounds_s) {
    bounds_ns_.clear();
    for (double b : bounds_s) bounds_ns_.push_back(static_cast<int64_t>(b * 1e9));
    counts_ = std::vector<std::atomic<uint64_t>>(bounds_ns_.size() + 1);
  }
  void Observe(int64_t ns) {
    if (ns < 0) ns = 0;
    size_t i = 0;
    while (i < bounds_ns_.size() && ns > bounds_ns_[i]) ++i;  // le: inclusive bound
    counts_[i].fetch_add(1, std::memory_order_relaxed);
    sum_ns_.fetch_add(static_cast<uint64_t>(ns), std::memory_order_relaxed);
  }
  // (per-bucket counts, the last one above every bound; the sum in seconds)
  PyObject* Snapshot() const {
    PyObject* counts = PyList_New(static_cast<Py_ssize_t>(counts_.size()));
    if (counts == nullptr) return nullptr;
    for (size_t i = 0; i < counts_.size(); ++i)
      PyList_SET_ITEM(counts, static_cast<Py_ssize_t>(i),
                      PyLong_FromUnsignedLongLong(counts_[i].load(std::memory_order_relaxed)));
    double sum = static_cast<double>(sum_ns_.load(std::memory_order_relaxed)) / 1e9;
    return Py_BuildValue("(Nd)", counts, sum);
  }

 private:
  std::vector<int64_t> bounds_ns_;
  std::vector<std::atomic<uint64_t>> counts_;
  std::atomic<uint64_t> sum_ns_{0};
};

// What the completion-queue thread runs when an operation it tagged completes.
class Handler {
 public:
  virtual ~Handler() = default;
  virtual void Proceed(bool ok) = 0;
};

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
  int64_t posted_ns = 0;         // when it was queued (NowNs)
};

class Core;

// An owned Python reference, released however its scope is left (a C++ exception
// included). GIL held.
class Owned {
 public:
  explicit Owned(PyObject* o) : p_(o) {}
  ~Owned() { Py_XDECREF(p_); }
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  PyObject* get() const { return p_; }

 private:
  PyObject* p_;
};

//: the longest the completion-queue thread stands aside while the event loop runs this
//: server's jobs (ServeCompletions), ns: a few picks' worth
constexpr int64_t kLoopWaitNs = 1000000;

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

  // The streams alive (waiting for a call, or open): stopping waits for none.
  void StreamBorn() {
    std::lock_guard<std::mutex> lock(streams_mu_);
    ++streams_;
  }
  void StreamGone() {
    std::lock_guard<std::mutex> lock(streams_mu_);
    if (--streams_ == 0) streams_cv_.notify_all();
  }
  void WaitNoStreams() {
    std::unique_lock<std::mutex> lock(streams_mu_);
    streams_cv_.wait(lock, [this] { return streams_ == 0; });
  }

  // Health: statuses by service name, and the Watch calls to tell (any thread).
  void SetServing(const std::string& name, bool serving);
  bool Lookup(const std::string& name, ServingStatus* status);
  void AddWatcher(WatchCall* watcher);
  void RemoveWatcher(WatchCall* watcher);
  void CloseWatchers();  // stopping: every Watch call ends, and any that starts later

  ep::ExternalProcessor::AsyncService service;
  hv1::Health::AsyncService health;
  grpc::ServerCompletionQueue* cq = nullptr;  // owned by the ServerObject
  std::atomic<bool> accepting{true};          // a stream that gets its call asks for the next

  // Any thread: queue a job for the event loop and wake it (once per batch).
  void Post(Job job);
  // The event loop (GIL held): run the jobs queued so far.
  void Drain();
  // The completion-queue thread, after the completions at hand: while the event loop
  // runs this server's jobs (Drain), wait until it is done, at most kLoopWaitNs (see
  // ServeCompletions).
  void WaitForLoop();

  // Seconds per request, from its end reaching this server to its answer written
  // (decision), of which waiting for the event loop (queue) and Python's pick (pick).
  LatencyHistogram decision, queue, pick;
  // GIL held, the server going away for good (no drain to come): the picks queued now
  // or later fail at once (Python is not asked: nothing would run them), the rest run.
  void FailPending();

 private:
  void RunPick(Job& job);
  PyObject* CallPick(Job& job);
  void Answer(Job& job, PyObject* result);
  void RunExchangeCall(Job& job);
  // ``job`` run (its pick aborted instead with ``abort_picks``), isolated from the
  // rest of its batch: what it throws is kept in ``failure`` (the first of the batch)
  // and fails this job alone (RecoverFrom).
  void RunIsolated(Job& job, bool abort_picks, std::exception_ptr& failure);
  void RecoverFrom(Job& job);

  Names names_;
  PyObject* bridge_;  // borrowed: the Python Server object keeps it alive
  int efd_ = -1;
  std::mutex mu_;
  std::deque<Job> queue_;
  bool signalled_ = false;
  bool stopping_ = false;  // set by FailPending: picks are no longer queued
  bool draining_ = false;  // the event loop is running jobs (Drain)
  std::condition_variable drained_cv_;  // draining_ became false
  std::mutex streams_mu_;
  std::condition_variable streams_cv_;
  long streams_ = 0;
  std::mutex health_mu_;  // taken before a WatchCall's own lock, never after
  std::map<std::string, bool> serving_;
  std::set<WatchCall*> watchers_;
  bool watchers_closed_ = false;
};

// One ext_proc stream = one HTTP request, from the moment it waits for its call. Its
// state is touched by one thread at a time: the completion-queue thread on the one
// operation in flight, or the event loop running the stream's pick job (posted as the
// thread's last act; the answer's first write is the job's last touch).
class Stream final : public Handler {
 public:
  explicit Stream(Core* core) : core_(core), rw_(&ctx_) {
    core_->StreamBorn();
    core_->service.RequestProcess(&ctx_, &rw_, core_->cq, core_->cq, this);
  }

  // The completion-queue thread: the operation in flight completed.
  void Proceed(bool ok) override {
    switch (op_) {
      case Op::kCall:
        if (!ok) {  // the server is shutting down
          Delete();
          return;
        }
        if (core_->accepting) new Stream(core_);  // the next call
        StartRead(&req_);
        return;
      case Op::kRead: OnReadDone(ok); return;
      case Op::kWrite: OnWriteDone(ok); return;
      case Op::kFinish: Delete(); return;
    }
  }

  void OnReadDone(bool ok) {
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

  void OnWriteDone(bool ok) {
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

  // The event loop, GIL held: the pick's exchange (a reference the stream now owns, or
  // null), taken before its answer is built (Core::Answer), so that a failure between
  // the two still closes it.
  void Adopt(PyObject* exchange) {
    if (exchange_ != nullptr) {  // a second request on the stream: the first is forgotten
      PyObject* closed = PyObject_CallMethod(exchange_, "close", nullptr);
      if (closed == nullptr) PyErr_WriteUnraisable(exchange_);
      Py_XDECREF(closed);
      Py_DECREF(exchange_);
    }
    exchange_ = exchange;
  }

  // The event loop, GIL held: the pick's outcome (see the file's contract), after
  // Adopt. It starts the stream's next operation as its last act: should anything
  // before throw, the stream is still the caller's to answer again (a failed pick's
  // answer, which closes the exchange adopted: Core::RecoverFrom).
  void Answer(const std::string* destination, long status, const std::string& message,
              const std::string& body, bool headers_only) {
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

  // The event loop: the answer of a pick that failed (gRPC UNKNOWN), the exchange
  // adopted closed.
  void Fail(bool headers_only) { Answer(nullptr, 0, "", "", headers_only); }

  // The server is going away before the pick ran.
  void Abort() { End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the endpoint picker stopped")); }

  // The event loop, GIL held, the last resort when a failed pick's answer (Fail) threw
  // as well, so that no operation is in flight (Core::RecoverFrom): the call ends at
  // once with gRPC UNKNOWN, without a job. The exchange still adopted is closed and
  // released here (GIL held) instead of by a close job. Without this the stream would
  // never get a completion, never go (StreamGone), and stopping the server would wait
  // for it for ever. Its status's message fits std::string's inline buffer: building
  // it does not meet the bad_alloc that got here again (grpc's core aborts rather than
  // throws when it cannot allocate; Python's failures are reported as unraisable).
  void FinishNow() {
    if (exchange_ != nullptr) {
      PyObject* closed = PyObject_CallMethod(exchange_, "close", nullptr);
      if (closed == nullptr) PyErr_WriteUnraisable(exchange_);
      Py_XDECREF(closed);
      Py_DECREF(exchange_);
      exchange_ = nullptr;
    }
    Finish(grpc::Status(grpc::StatusCode::UNKNOWN, "pick failed"));
  }

 private:
  enum class Op { kCall, kRead, kWrite, kFinish };

  void StartRead(ep::ProcessingRequest* req) {
    op_ = Op::kRead;
    rw_.Read(req, this);
  }
  void StartWrite(const ep::ProcessingResponse* resp) {
    op_ = Op::kWrite;
    rw_.Write(*resp, this);
  }
  void Finish(const grpc::Status& status) {
    op_ = Op::kFinish;
    rw_.Finish(status, this);
  }
  void Delete() {
    Core* core = core_;
    delete this;
    core->StreamGone();
  }

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
    // the request's answer: timed until gRPC has it (the write's completion may reach
    // the completion-queue thread later, and the stream may be gone by then)
    Core* core = core_;
    int64_t request_end = request_end_ns_;
    request_end_ns_ = 0;
    StartWrite(&out_.front());
    if (request_end != 0) core->decision.Observe(NowNs() - request_end);
  }

  void End(const grpc::Status& status) {
    if (exchange_ != nullptr) {
      Job job{JobKind::kClose};
      job.exchange = exchange_;
      job.owns_exchange = true;
      core_->Post(std::move(job));
      exchange_ = nullptr;  // the job's now (kept here, should Post throw)
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
    request_end_ns_ = NowNs();
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
  grpc::ServerContext ctx_;
  grpc::ServerAsyncReaderWriter<ep::ProcessingResponse, ep::ProcessingRequest> rw_;
  Op op_ = Op::kCall;
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
  int64_t request_end_ns_ = 0;  // the request's end read, its answer not yet written
  PyObject* exchange_ = nullptr;  // owned reference, released by a job (GIL)
};

// grpc.health.v1.Health/Check: one call, one answer.
class CheckCall final : public Handler {
 public:
  explicit CheckCall(Core* core) : core_(core), responder_(&ctx_) {
    core_->StreamBorn();
    core_->health.RequestCheck(&ctx_, &req_, &responder_, core_->cq, core_->cq, this);
  }

  void Proceed(bool ok) override {
    if (!ok || answered_) {  // shutting down, or the answer went
      Core* core = core_;
      delete this;
      core->StreamGone();
      return;
    }
    if (core_->accepting) new CheckCall(core_);
    answered_ = true;
    ServingStatus status;
    if (core_->Lookup(req_.service(), &status)) {
      hv1::HealthCheckResponse resp;
      resp.set_status(status);
      responder_.Finish(resp, grpc::Status::OK, this);
    } else {
      responder_.FinishWithError(grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service"),
                                 this);
    }
  }

 private:
  Core* core_;
  grpc::ServerContext ctx_;
  hv1::HealthCheckRequest req_;
  grpc::ServerAsyncResponseWriter<hv1::HealthCheckResponse> responder_;
  bool answered_ = false;
};

// grpc.health.v1.Health/Watch: the status now, then each time it is set, until the
// client goes (seen at the next write) or the server stops.
class WatchCall final : public Handler {
 public:
  explicit WatchCall(Core* core) : core_(core), writer_(&ctx_) {
    core_->StreamBorn();
    core_->health.RequestWatch(&ctx_, &req_, &writer_, core_->cq, core_->cq, this);
  }

  const std::string& service() const { return req_.service(); }

  void Proceed(bool ok) override {
    if (!started_) {
      if (!ok) {
        Delete();
        return;
      }
      started_ = true;
      if (core_->accepting) new WatchCall(core_);
      core_->AddWatcher(this);  // sends the status now
      return;
    }
    std::unique_lock<std::mutex> lock(mu_);
    if (finish_sent_ && !writing_) {  // the Finish completed
      lock.unlock();
      core_->RemoveWatcher(this);
      Delete();
      return;
    }
    writing_ = false;
    if (!ok) closing_ = true;  // the client went
    if (closing_) {
      SendFinish();
    } else if (has_pending_) {
      has_pending_ = false;
      SendStatus(pending_);
    }
  }

  // Any thread (Core's health lock held): tell the client ``status``.
  void Update(ServingStatus status) {
    std::lock_guard<std::mutex> lock(mu_);
    if (closing_) return;
    if (writing_) {
      pending_ = status;
      has_pending_ = true;
    } else {
      SendStatus(status);
    }
  }

  // Any thread (Core's health lock held): end the call.
  void Close() {
    std::lock_guard<std::mutex> lock(mu_);
    closing_ = true;
    if (!writing_ && !finish_sent_) SendFinish();
  }

 private:
  void SendStatus(ServingStatus status) {  // mu_ held
    resp_.set_status(status);
    writing_ = true;
    writer_.Write(resp_, this);
  }
  void SendFinish() {  // mu_ held
    if (finish_sent_) return;
    finish_sent_ = true;
    writer_.Finish(grpc::Status::OK, this);
  }
  void Delete() {
    Core* core = core_;
    delete this;
    core->StreamGone();
  }

  Core* core_;
  grpc::ServerContext ctx_;
  hv1::HealthCheckRequest req_;
  hv1::HealthCheckResponse resp_;
  grpc::ServerAsyncWriter<hv1::HealthCheckResponse> writer_;
  bool started_ = false;  // the completion-queue thread's alone
  std::mutex mu_;
  bool writing_ = false, has_pending_ = false, closing_ = false, finish_sent_ = false;
  ServingStatus pending_ = hv1::HealthCheckResponse::UNKNOWN;
};

void Core::SetServing(const std::string& name, bool serving) {
  std::lock_guard<std::mutex> lock(health_mu_);
  serving_[name] = serving;
  for (WatchCall* w : watchers_)
    if (w->service() == name)
      w->Update(serving ? hv1::HealthCheckResponse::SERVING
                        : hv1::HealthCheckResponse::NOT_SERVING);
}

bool Core::Lookup(const std::string& name, ServingStatus* status) {
  std::lock_guard<std::mutex> lock(health_mu_);
  auto it = serving_.find(name);
  if (it == serving_.end()) return false;
  *status = it->second ? hv1::HealthCheckResponse::SERVING
                       : hv1::HealthCheckResponse::NOT_SERVING;
  return true;
}

void Core::AddWatcher(WatchCall* watcher) {
  std::lock_guard<std::mutex> lock(health_mu_);
  if (watchers_closed_) {
    watcher->Close();
    return;
  }
  watchers_.insert(watcher);
  auto it = serving_.find(watcher->service());
  watcher->Update(it == serving_.end() ? hv1::HealthCheckResponse::SERVICE_UNKNOWN
                  : it->second         ? hv1::HealthCheckResponse::SERVING
                                       : hv1::HealthCheckResponse::NOT_SERVING);
}

void Core::RemoveWatcher(WatchCall* watcher) {
  std::lock_guard<std::mutex> lock(health_mu_);
  watchers_.erase(watcher);
}

void Core::CloseWatchers() {
  std::lock_guard<std::mutex> lock(health_mu_);
  watchers_closed_ = true;
  for (WatchCall* w : watchers_) w->Close();
}

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
  int64_t started = NowNs();
  queue.Observe(started - job.posted_ns);
  PyObject* result = CallPick(job);
  pick.Observe(NowNs() - started);
  Answer(job, result);
}

PyObject* Core::CallPick(Job& job) {
  Owned headers(HeaderDict(job.headers));
  Owned body(PyBytes_FromStringAndSize(job.data.data(),
                                       static_cast<Py_ssize_t>(job.data.size())));
  Owned subset(SubsetSet(job));
  if (!headers.get() || !body.get() || !subset.get()) return nullptr;
  return PyObject_CallMethod(bridge_, "pick", "OOO", headers.get(), body.get(), subset.get());
}

// The pick's outcome (a new reference, or null: it raised) handed to the stream. The
// stream adopts the exchange before anything that can throw (the strings' copies),
// and its Answer starts its next operation as its last act: after a throw the stream
// still waits for an answer and owns the exchange, which the failed pick's answer
// closes (RecoverFrom).
void Core::Answer(Job& job, PyObject* result) {
  Owned owned(result);
  Stream* stream = job.stream;
  if (result == nullptr || !PyTuple_Check(result) || PyTuple_GET_SIZE(result) != 2) {
    if (result == nullptr) PyErr_WriteUnraisable(bridge_);
    stream->Adopt(nullptr);
    stream->Fail(job.headers_only);
    return;
  }
  PyObject* exchange = PyTuple_GET_ITEM(result, 0);
  PyObject* answer = PyTuple_GET_ITEM(result, 1);
  Py_ssize_t n = 0;
  if (exchange != Py_None && PyUnicode_Check(answer)) {
    Py_INCREF(exchange);
    stream->Adopt(exchange);  // the stream's now: an error below still closes it
    const char* value = PyUnicode_AsUTF8AndSize(answer, &n);
    if (value == nullptr) {  // not UTF-8 encodable (a lone surrogate): the pick failed
      PyErr_WriteUnraisable(bridge_);
      stream->Fail(job.headers_only);
      return;
    }
    std::string dest(value, static_cast<size_t>(n));
    stream->Answer(&dest, 0, "", "", job.headers_only);
    return;
  }
  long status = 0;
  const char *message = nullptr, *body_data = nullptr;
  Py_ssize_t message_n = 0, body_n = 0;
  if (exchange == Py_None && PyTuple_Check(answer) &&
      PyArg_ParseTuple(answer, "ls#y#", &status, &message, &message_n, &body_data, &body_n)) {
    stream->Adopt(nullptr);
    std::string m(message, static_cast<size_t>(message_n));
    std::string b(body_data, static_cast<size_t>(body_n));
    stream->Answer(nullptr, status, m, b, job.headers_only);
    return;
  }
  if (PyErr_Occurred()) PyErr_WriteUnraisable(bridge_);
  // an exchange with an answer of no known shape: the stream still closes it
  PyObject* orphan = exchange == Py_None ? nullptr : exchange;
  Py_XINCREF(orphan);
  stream->Adopt(orphan);
  stream->Fail(job.headers_only);
}

void Core::RunExchangeCall(Job& job) {
  Owned owned(job.owns_exchange ? job.exchange : nullptr);  // dropped however this ends
  PyObject* result = nullptr;
  if (job.kind == JobKind::kClose) {
    result = PyObject_CallMethod(job.exchange, "close", nullptr);
  } else if (job.kind == JobKind::kServed) {
    Owned address(Text(job.data));
    if (address.get()) result = PyObject_CallMethod(job.exchange, "served", "O", address.get());
  } else {
    Owned status(job.has_status ? Text(job.status) : (Py_INCREF(Py_None), Py_None));
    Owned type(Text(job.content_type));
    Owned chunk(job.has_chunk
        ? PyBytes_FromStringAndSize(job.data.data(), static_cast<Py_ssize_t>(job.data.size()))
        : (Py_INCREF(Py_None), Py_None));
    if (status.get() && type.get() && chunk.get())
      result = PyObject_CallMethod(job.exchange, "response", "OOOO", status.get(), type.get(),
                                   chunk.get(), job.end ? Py_True : Py_False);
  }
  if (result == nullptr) PyErr_WriteUnraisable(job.exchange);
  Py_XDECREF(result);
}

void Core::RunIsolated(Job& job, bool abort_picks, std::exception_ptr& failure) {
  try {
    if (job.kind != JobKind::kPick) {
      RunExchangeCall(job);
    } else if (abort_picks) {
      job.stream->Abort();
    } else {
      RunPick(job);
    }
  } catch (...) {
    if (!failure) failure = std::current_exception();
    RecoverFrom(job);
  }
}

// ``job`` threw: a Python error it left is reported (not carried into the next job),
// and a pick's stream, still waiting (Core::Answer), gets the answer of a failed pick;
// should that throw as well (posting the exchange's close job), the call is finished
// at once without a job (Stream::FinishNow), so that the stream still ends and the
// server can stop.
void Core::RecoverFrom(Job& job) {
  if (PyErr_Occurred()) PyErr_WriteUnraisable(bridge_);
  if (job.kind != JobKind::kPick) return;  // its references went with it (Owned)
  try {
    job.stream->Fail(job.headers_only);
  } catch (...) {
    if (PyErr_Occurred()) PyErr_WriteUnraisable(bridge_);
    job.stream->FinishNow();
  }
}

void Core::Post(Job job) {
  job.posted_ns = NowNs();
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
    draining_ = true;
  }
  // draining_ is reset and the completion-queue thread woken however Drain leaves (a
  // job that throws included): left true, that thread would stand aside for
  // kLoopWaitNs after every batch of completions for good (WaitForLoop)
  struct EndOfDrain {
    Core* core;
    ~EndOfDrain() {
      {
        std::lock_guard<std::mutex> lock(core->mu_);
        core->draining_ = false;
      }
      core->drained_cv_.notify_all();
    }
  } end_of_drain{this};
  // each job isolated: one that throws fails alone, the rest of the batch still runs
  std::exception_ptr failure;
  for (auto& job : jobs) RunIsolated(job, false, failure);
  if (failure) std::rethrow_exception(failure);  // for drain() to raise
}

void Core::WaitForLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  drained_cv_.wait_for(lock, std::chrono::nanoseconds(kLoopWaitNs), [this] {
    return stopping_ || !draining_;
  });
}

void Core::FailPending() {
  std::deque<Job> jobs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    jobs.swap(queue_);
    signalled_ = false;
  }
  drained_cv_.notify_all();
  std::exception_ptr failure;  // no drain() to raise it: reported as unraisable
  for (auto& job : jobs) RunIsolated(job, true, failure);
  if (failure) {
    try {
      std::rethrow_exception(failure);
    } catch (const std::bad_alloc&) {
      PyErr_NoMemory();
    } catch (const std::exception& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    } catch (...) {
      PyErr_SetString(PyExc_RuntimeError, "a job failed while the server stopped");
    }
    PyErr_WriteUnraisable(bridge_);
  }
}

// --------------------------------------------------------------------------
// The Python type: _eppnative.Server
// --------------------------------------------------------------------------
//: calls waited for at once (each stream asks for the next when its call comes)
constexpr int kWaitingStreams = 8;

// The completion-queue thread's loop. It handles every completion at hand (the first
// waited for, the rest taken as long as they come without waiting); then, if the event
// loop is running this server's jobs (Core::Drain), it stands aside until the loop is
// done (Core::WaitForLoop) before it takes the next completions. Both threads share the
// router's CPU, and a thread the kernel wakes preempts the running one: without this, a
// pick was preempted for each message of another stream. Now such a thread switch
// happens at most once per drain, and the completions that came meanwhile (the answers'
// writes among them) are handled in one go afterwards (docs/gateway.md, "One thread at
// a time"). It does not wait for jobs the loop has not started: a loop busy elsewhere or
// not scheduled then does not hold the streams' I/O. The wait is bounded (kLoopWaitNs):
// a long pick does not hold the messages that need no decision.
void ServeCompletions(grpc::ServerCompletionQueue* queue, Core* core) {
  void* tag;
  bool ok;
  while (queue->Next(&tag, &ok)) {
    static_cast<Handler*>(tag)->Proceed(ok);
    while (queue->AsyncNext(&tag, &ok, gpr_time_0(GPR_CLOCK_MONOTONIC)) ==
           grpc::CompletionQueue::GOT_EVENT)
      static_cast<Handler*>(tag)->Proceed(ok);
    if (!core->floor()) core->WaitForLoop();
  }
}

struct ServerObject {
  PyObject_HEAD
  PyObject* bridge;
  Core* core;
  grpc::Server* server;
  grpc::ServerCompletionQueue* cq;
  std::thread* cq_thread;
  int port;
  bool shut_down;
};

// Stop accepting, cancel the streams left after grace_s, wait until every stream is
// gone (the event loop answers the picks queued meanwhile, or FailPending aborted
// them), then stop the completion-queue thread. Runs without the GIL.
void StopServer(ServerObject* self, double grace_s) {
  if (self->server == nullptr || self->shut_down) return;
  self->shut_down = true;
  auto deadline = std::chrono::system_clock::now() +
                  std::chrono::microseconds(static_cast<long long>(grace_s * 1e6));
  Core* core = self->core;
  grpc::Server* server = self->server;
  grpc::ServerCompletionQueue* cq = self->cq;
  std::thread* thread = self->cq_thread;
  Py_BEGIN_ALLOW_THREADS
  core->accepting = false;
  core->CloseWatchers();
  server->Shutdown(deadline);
  core->WaitNoStreams();
  cq->Shutdown();
  thread->join();
  Py_END_ALLOW_THREADS
}

// The histograms' upper bounds (seconds): increasing finite floats. False (a Python
// error set) otherwise.
bool ReadBounds(PyObject* buckets, std::vector<double>* bounds) {
  PyObject* seq = PySequence_Fast(buckets, "latency_buckets: a sequence of seconds");
  if (seq == nullptr) return false;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    double b = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
    if (b == -1.0 && PyErr_Occurred()) break;
    if (!(b > 0 && b < 1e6) || (!bounds->empty() && b <= bounds->back())) {
      PyErr_SetString(PyExc_ValueError,
                      "latency_buckets: increasing positive seconds below 1e6");
      break;
    }
    bounds->push_back(b);
  }
  Py_DECREF(seq);
  return !PyErr_Occurred();
}

int Server_init(ServerObject* self, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"address", "bridge", "destination_header", "lb_namespace",
                             "subset_namespace", "subset_key", "served_key",
                             "latency_buckets", nullptr};
  const char *address, *dest, *lb, *subset_ns, *subset_key, *served;
  PyObject* bridge;
  PyObject* buckets = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sOsssss|O", const_cast<char**>(kw),
                                   &address, &bridge, &dest, &lb, &subset_ns, &subset_key,
                                   &served, &buckets))
    return -1;
  if (self->core != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "Server already initialised");
    return -1;
  }
  std::vector<double> bounds;
  if (buckets != nullptr && !ReadBounds(buckets, &bounds)) return -1;
  Py_INCREF(bridge);
  self->bridge = bridge;
  self->core = new Core(Names{dest, lb, subset_ns, subset_key, served},
                        bridge == Py_None ? nullptr : bridge);
  if (self->core->fd() < 0) {
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
  }
  for (LatencyHistogram* h : {&self->core->decision, &self->core->queue, &self->core->pick})
    h->SetBounds(bounds);
  grpc::ServerBuilder builder;
  builder.AddChannelArgument("grpc.enable_channelz", 0);
  // SO_REUSEPORT (grpc++'s default) would let this server bind a port another server
  // listens on and silently share it; off, a taken port fails BuildAndStart (epp.py's
  // NO_SHARED_PORT)
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &self->port);
  builder.RegisterService(&self->core->service);
  builder.RegisterService(&self->core->health);
  std::unique_ptr<grpc::ServerCompletionQueue> cq = builder.AddCompletionQueue();
  std::string where(address);
  std::unique_ptr<grpc::Server> server;
  Py_BEGIN_ALLOW_THREADS
  server = builder.BuildAndStart();
  Py_END_ALLOW_THREADS
  if (!server || self->port == 0) {
    server.reset();
    cq->Shutdown();  // a completion queue is drained before it goes
    void* tag;
    bool ok;
    while (cq->Next(&tag, &ok)) {
    }
    PyErr_Format(PyExc_OSError, "cannot listen on %s (gRPC)", where.c_str());
    return -1;
  }
  self->server = server.release();
  self->cq = cq.release();
  self->core->cq = self->cq;
  for (int i = 0; i < kWaitingStreams; ++i) new Stream(self->core);
  new CheckCall(self->core);
  new WatchCall(self->core);
  grpc::ServerCompletionQueue* queue = self->cq;
  Core* core = self->core;
  self->cq_thread = new std::thread([queue, core] { ServeCompletions(queue, core); });
  return 0;
}

void Server_dealloc(ServerObject* self) {
  // dealloc may run while an exception is being raised (the server dropped during
  // unwinding): it is put aside while the jobs left call Python and report their own
  // failures (FailPending), and restored after, not erased
  PyObject *type, *value, *traceback;
  PyErr_Fetch(&type, &value, &traceback);
  if (self->server != nullptr) {
    self->core->FailPending();  // no loop will drain any more
    StopServer(self, 0.0);
    self->core->FailPending();
    delete self->server;
    delete self->cq;
    delete self->cq_thread;
  }
  delete self->core;
  Py_XDECREF(self->bridge);
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
  PyErr_Restore(type, value, traceback);
}

PyObject* Server_fileno(ServerObject* self, PyObject*) { return PyLong_FromLong(self->core->fd()); }

PyObject* Server_drain(ServerObject* self, PyObject*) {
  // a C++ exception must not cross into the interpreter: a job's (the first of the
  // batch, whose other jobs all ran: Core::Drain) becomes the loop callback's Python
  // exception, and the next drain runs as usual
  try {
    self->core->Drain();
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "a job of the endpoint picker failed");
    return nullptr;
  }
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
  self->core->SetServing(name, serving != 0);
  Py_RETURN_NONE;
}

PyObject* Server_port(ServerObject* self, void*) { return PyLong_FromLong(self->port); }

PyObject* Server_latency(ServerObject* self, PyObject*) {
  Core* core = self->core;
  if (core == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "Server not initialised");
    return nullptr;
  }
  return Py_BuildValue("{sNsNsN}", "decision", core->decision.Snapshot(), "queue",
                       core->queue.Snapshot(), "pick", core->pick.Snapshot());
}

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
    {"latency", reinterpret_cast<PyCFunction>(Server_latency), METH_NOARGS,
     "latency() -> {name: (counts, sum_s)}: the histograms 'decision' (a request's end "
     "read to its answer written), 'queue' (its pick waiting for the event loop) and "
     "'pick' (Python's call); counts per bucket of latency_buckets, the last one above "
     "every bound"},
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
      "subset_key, served_key, latency_buckets=()): the ext_proc gRPC server, started";
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
