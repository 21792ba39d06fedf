// joulepool's compiled ext_proc load generator (`joulepool bench picker`'s default
// client where `make native` built it): plays a gateway's side of Envoy's ext_proc v3
// against an endpoint picker on loopback, one stream per HTTP request, with messages
// prepared by the benchmark (Python, the xds-protos classes), on one thread and one
// completion queue, so that the client costs the machine little CPU beside the server.
//
//   eppload PORT SECONDS RATE CONCURRENCY RESPOND MESSAGES OUT [SEED]
//
// * MESSAGES: sets of four serialised envoy.service.ext_proc.v3.ProcessingRequest
//   (request headers, request body, response headers, response body), each message a
//   4-byte little-endian length then its bytes; request i uses set i % sets.
// * RATE > 0: open loop, Poisson arrivals at RATE requests/s (exponential gaps from
//   SEED, default 0), each request on its own stream whatever the others do, for
//   SECONDS; RATE 0: closed loop, CONCURRENCY streams back to back for SECONDS.
// * Per request: write the headers, read their reply, write the body, read the answer
//   (the latency is the time from starting the stream to reading that answer: what a
//   request waits at the gateway for the picker); with RESPOND 1 and an answer that is
//   not an immediate response, then the response headers and body, each read back;
//   then half-close and the stream's status.
// * OUT: JSON {"done": exchanges completed with status OK, "errors": the others,
//   "latencies": [s per completed exchange], "lags": [s each open-loop arrival started
//   after its scheduled time]}. Exit 0; 2 on bad arguments or an unreadable MESSAGES.

#include <grpcpp/alarm.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "envoy/service/ext_proc/v3/external_processor.grpc.pb.h"

namespace {

namespace ep = envoy::service::ext_proc::v3;
using Clock = std::chrono::steady_clock;
using Messages = std::vector<ep::ProcessingRequest>;  // headers, body, resp headers, resp body

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// gRPC's deadlines are system_clock ones: the steady time point ``t`` on that clock.
std::chrono::system_clock::time_point Deadline(Clock::time_point t) {
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(t - Clock::now());
}

class Tag {
 public:
  virtual ~Tag() = default;
  virtual void Proceed(bool ok) = 0;
};

struct Load {
  ep::ExternalProcessor::Stub* stub = nullptr;
  grpc::CompletionQueue cq;
  std::vector<Messages> sets;
  bool respond = true;
  Clock::time_point stop;
  long in_flight = 0;
  long done = 0, errors = 0;
  std::vector<double> latencies, lags;
  bool arrivals_over = false;
  // closed loop: a stream that ends starts the next (its worker's next index)
  int concurrency = 0;
  void Start(size_t index);
};

// One HTTP request's stream, one operation in flight at a time.
class Call final : public Tag {
 public:
  Call(Load* load, size_t index) : load_(load), msgs_(load->sets[index % load->sets.size()]),
                                   index_(index) {
    ++load_->in_flight;
    started_ = Clock::now();
    rw_ = load_->stub->PrepareAsyncProcess(&ctx_, &load_->cq);
    step_ = Step::kStart;
    rw_->StartCall(this);
  }

  void Proceed(bool ok) override {
    if (!ok && step_ != Step::kWritesDone && step_ != Step::kFinish) {
      failed_ = true;  // the stream broke (or the picker closed it early)
      Finish();
      return;
    }
    switch (step_) {
      case Step::kStart: Write(0, Step::kWroteHeaders); return;
      case Step::kWroteHeaders: Read(Step::kReadHeaders); return;
      case Step::kReadHeaders: Write(1, Step::kWroteBody); return;
      case Step::kWroteBody: Read(Step::kReadAnswer); return;
      case Step::kReadAnswer:
        latency_ = Seconds(Clock::now() - started_);
        if (load_->respond && !resp_.has_immediate_response()) {
          Write(2, Step::kWroteResponseHeaders);
        } else {
          WritesDone();
        }
        return;
      case Step::kWroteResponseHeaders: Read(Step::kReadResponseHeaders); return;
      case Step::kReadResponseHeaders: Write(3, Step::kWroteResponseBody); return;
      case Step::kWroteResponseBody: Read(Step::kReadResponseBody); return;
      case Step::kReadResponseBody: WritesDone(); return;
      case Step::kWritesDone: Finish(); return;  // not ok: the picker closed first
      case Step::kFinish: End(); return;
    }
  }

 private:
  enum class Step {
    kStart, kWroteHeaders, kReadHeaders, kWroteBody, kReadAnswer, kWroteResponseHeaders,
    kReadResponseHeaders, kWroteResponseBody, kReadResponseBody, kWritesDone, kFinish
  };

  void Write(int message, Step next) {
    step_ = next;
    rw_->Write(msgs_[static_cast<size_t>(message)], this);
  }
  void Read(Step next) {
    step_ = next;
    rw_->Read(&resp_, this);
  }
  void WritesDone() {
    step_ = Step::kWritesDone;
    rw_->WritesDone(this);
  }
  void Finish() {
    step_ = Step::kFinish;
    rw_->Finish(&status_, this);
  }
  void End() {
    Load* load = load_;
    if (failed_ || !status_.ok() || latency_ < 0) {
      ++load->errors;
    } else {
      ++load->done;
      load->latencies.push_back(latency_);
    }
    --load->in_flight;
    size_t next = index_ + static_cast<size_t>(load->concurrency);
    delete this;
    if (load->concurrency > 0 && Clock::now() < load->stop) load->Start(next);
  }

  Load* load_;
  const Messages& msgs_;
  size_t index_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientAsyncReaderWriter<ep::ProcessingRequest, ep::ProcessingResponse>>
      rw_;
  ep::ProcessingResponse resp_;
  grpc::Status status_;
  Step step_ = Step::kStart;
  Clock::time_point started_;
  double latency_ = -1;
  bool failed_ = false;
};

void Load::Start(size_t index) { new Call(this, index); }

// Open loop: an alarm per arrival, each starting its request at its scheduled time.
class Arrivals final : public Tag {
 public:
  Arrivals(Load* load, double rate, uint64_t seed)
      : load_(load), gaps_(rate), rng_(seed), next_(Clock::now()) {
    Schedule();
  }

  void Proceed(bool) override {
    load_->lags.push_back(Seconds(Clock::now() - next_));
    load_->Start(index_++);
    Schedule();
  }

 private:
  void Schedule() {
    next_ += std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(gaps_(rng_)));
    if (next_ >= load_->stop) {
      load_->arrivals_over = true;
      return;
    }
    alarm_.Set(&load_->cq, Deadline(next_), this);
  }

  Load* load_;
  std::exponential_distribution<double> gaps_;
  std::mt19937_64 rng_;
  Clock::time_point next_;
  size_t index_ = 0;
  grpc::Alarm alarm_;
};

bool ReadMessages(const char* path, std::vector<Messages>* sets) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t at = 0;
  Messages set;
  while (at < data.size()) {
    if (data.size() - at < 4) return false;
    const auto* p = reinterpret_cast<const unsigned char*>(data.data() + at);
    size_t n = p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<size_t>(p[3]) << 24);
    at += 4;
    if (data.size() - at < n) return false;
    set.emplace_back();
    if (!set.back().ParseFromArray(data.data() + at, static_cast<int>(n))) return false;
    at += n;
    if (set.size() == 4) sets->push_back(std::move(set)), set.clear();
  }
  return set.empty() && !sets->empty();
}

void WriteList(FILE* f, const std::vector<double>& xs) {
  fputc('[', f);
  for (size_t i = 0; i < xs.size(); ++i) fprintf(f, i ? ",%.9g" : "%.9g", xs[i]);
  fputc(']', f);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 8 || argc > 9) {
    fprintf(stderr, "usage: eppload PORT SECONDS RATE CONCURRENCY RESPOND MESSAGES OUT [SEED]\n");
    return 2;
  }
  Load load;
  double seconds = atof(argv[2]), rate = atof(argv[3]);
  int concurrency = atoi(argv[4]);
  load.respond = atoi(argv[5]) != 0;
  uint64_t seed = argc == 9 ? strtoull(argv[8], nullptr, 10) : 0;
  if (!(seconds > 0) || rate < 0 || (rate == 0 && concurrency < 1)) {
    fprintf(stderr, "eppload: SECONDS > 0, and RATE > 0 or CONCURRENCY >= 1\n");
    return 2;
  }
  if (!ReadMessages(argv[6], &load.sets)) {
    fprintf(stderr, "eppload: cannot read the messages in %s\n", argv[6]);
    return 2;
  }
  grpc::ChannelArguments args;
  args.SetInt("grpc.enable_channelz", 0);
  auto channel = grpc::CreateCustomChannel(std::string("127.0.0.1:") + argv[1],
                                           grpc::InsecureChannelCredentials(), args);
  if (!channel->WaitForConnected(Deadline(Clock::now() + std::chrono::seconds(10)))) {
    fprintf(stderr, "eppload: cannot connect to 127.0.0.1:%s\n", argv[1]);
    return 1;
  }
  auto stub = ep::ExternalProcessor::NewStub(channel);
  load.stub = stub.get();
  load.stop = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                 std::chrono::duration<double>(seconds));
  std::unique_ptr<Arrivals> arrivals;
  if (rate > 0) {
    arrivals = std::make_unique<Arrivals>(&load, rate, seed);
  } else {
    load.concurrency = concurrency;
    load.arrivals_over = true;
    for (int w = 0; w < concurrency; ++w) load.Start(static_cast<size_t>(w));
  }
  auto hard_stop = load.stop + std::chrono::seconds(30);  // streams that never end
  void* tag;
  bool ok;
  while (!(load.arrivals_over && load.in_flight == 0)) {
    auto got = load.cq.AsyncNext(&tag, &ok, Deadline(hard_stop));
    if (got != grpc::CompletionQueue::GOT_EVENT) break;
    static_cast<Tag*>(tag)->Proceed(ok);
  }
  FILE* out = fopen(argv[7], "w");
  if (out == nullptr) {
    fprintf(stderr, "eppload: cannot write %s\n", argv[7]);
    return 2;
  }
  fprintf(out, "{\"done\": %ld, \"errors\": %ld, \"unfinished\": %ld, \"latencies\": ",
          load.done, load.errors, load.in_flight);
  WriteList(out, load.latencies);
  fputs(", \"lags\": ", out);
  WriteList(out, load.lags);
  fputs("}\n", out);
  fclose(out);
  fflush(stdout);
  _exit(0);  // streams left after the hard stop are not waited for
}
