// Open- or closed-loop gRPC load generator for tests/bench/chaos.py, on gRPC's C++ library.
//
// The bench's Python grpc.aio client spends about 260 us of CPU a unary call, so on the one core
// the bench leaves it, it cannot offer 3x the capacity of a privrank that answers from its
// cache. Measured side by side against one echo server on the other core: grpc.aio 260 us a
// call, Node's @grpc/grpc-js 250, Node's bare http2 190, this 150 (half of it the kernel's
// loopback TCP and wake-ups).
//
//   LOADGEN_TOKEN=... loadgen TARGET METHOD DEADLINE_MS SECONDS (rate R | concurrency K) REQUESTS OUT
//
// REQUESTS: serialized request messages, each a 4-byte little-endian length and the bytes;
// call i sends request i modulo their count. Open loop: call i is due at t0 + i / R, whatever
// the answers do (a late generator catches up at once). Closed loop: K calls in flight.
// Each call carries "authorization: Bearer $LOADGEN_TOKEN" (from the environment, so that it
// is not in the process list) and a deadline DEADLINE_MS after it is sent. Prints "t0 end" (the
// run's timetable) on stdout; OUT gets one line per call, in the order they were started:
//   due sent done code hex(response)
// times in seconds of CLOCK_MONOTONIC (Python's time.monotonic()), code gRPC's status number,
// the response's bytes only for OK.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <time.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

namespace {

double now_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

gpr_timespec at(double monotonic_s) {
  gpr_timespec t;
  t.clock_type = GPR_CLOCK_MONOTONIC;
  t.tv_sec = static_cast<int64_t>(monotonic_s);
  t.tv_nsec = static_cast<int32_t>((monotonic_s - static_cast<double>(t.tv_sec)) * 1e9);
  return t;
}

struct Call {
  double due = 0, sent = 0, done = 0;
  grpc::ClientContext context;
  grpc::ByteBuffer response;
  grpc::Status status;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader;
};

std::vector<grpc::ByteBuffer> read_requests(const char* path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<grpc::ByteBuffer> requests;
  uint32_t size = 0;
  while (in.read(reinterpret_cast<char*>(&size), sizeof size)) {
    std::string bytes(size, '\0');
    if (!in.read(bytes.data(), size)) break;
    grpc::Slice slice(bytes);
    requests.emplace_back(&slice, 1);
  }
  return requests;
}

void write_results(const char* path, const std::vector<std::unique_ptr<Call>>& calls) {
  FILE* out = std::fopen(path, "w");
  if (out == nullptr) {
    std::perror(path);
    std::exit(2);
  }
  std::vector<grpc::Slice> slices;
  for (const auto& call : calls) {
    std::fprintf(out, "%.6f %.6f %.6f %d ", call->due, call->sent, call->done,
                 static_cast<int>(call->status.error_code()));
    if (call->status.ok() && call->response.Dump(&slices).ok()) {
      for (const auto& slice : slices) {
        for (size_t k = 0; k < slice.size(); ++k) std::fprintf(out, "%02x", slice.begin()[k]);
      }
    }
    std::fputc('\n', out);
  }
  std::fclose(out);
}

}  // namespace

int main(int argc, char** argv) {
  const char* token = std::getenv("LOADGEN_TOKEN");
  if (argc != 9 || token == nullptr ||
      (std::strcmp(argv[5], "rate") != 0 && std::strcmp(argv[5], "concurrency") != 0)) {
    std::fprintf(stderr,
                 "usage: LOADGEN_TOKEN=... %s TARGET METHOD DEADLINE_MS SECONDS "
                 "(rate R | concurrency K) REQUESTS OUT\n",
                 argv[0]);
    return 2;
  }
  const std::string target = argv[1], method = argv[2];
  const std::string authorization = std::string("Bearer ") + token;
  const double deadline_s = std::atof(argv[3]) / 1000.0, seconds = std::atof(argv[4]);
  const bool open_loop = std::strcmp(argv[5], "rate") == 0;
  const double rate = open_loop ? std::atof(argv[6]) : 0.0;
  const long concurrency = open_loop ? 0 : std::atol(argv[6]);
  const auto requests = read_requests(argv[7]);
  if (requests.empty() || (open_loop ? rate <= 0 : concurrency <= 0)) {
    std::fprintf(stderr, "no requests, or a rate / concurrency <= 0\n");
    return 2;
  }

  // several channels, each its own connection, as the Python clients use
  grpc::ChannelArguments args;
  args.SetInt("grpc.use_local_subchannel_pool", 1);
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs;
  for (int k = 0; k < 4; ++k) {
    auto channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
    if (!channel->WaitForConnected(at(now_s() + 10.0))) {
      std::fprintf(stderr, "could not connect to %s\n", target.c_str());
      return 1;
    }
    stubs.push_back(std::make_unique<grpc::GenericStub>(channel));
  }

  grpc::CompletionQueue queue;
  std::vector<std::unique_ptr<Call>> calls;
  calls.reserve(open_loop ? static_cast<size_t>(rate * seconds) + 1 : 1 << 16);
  long in_flight = 0;
  auto start = [&](double due) {
    const size_t i = calls.size();
    auto call = std::make_unique<Call>();
    call->due = due;
    call->context.AddMetadata("authorization", authorization);
    call->sent = now_s();
    call->context.set_deadline(at(call->sent + deadline_s));
    call->reader = stubs[i % stubs.size()]->PrepareUnaryCall(&call->context, method,
                                                              requests[i % requests.size()], &queue);
    call->reader->StartCall();
    call->reader->Finish(&call->response, &call->status, call.get());
    calls.push_back(std::move(call));
    ++in_flight;
  };

  const double t0 = now_s(), end = t0 + seconds;
  for (;;) {
    const double now = now_s();
    double wake = end;
    if (now < end) {
      if (open_loop) {
        double due = t0 + static_cast<double>(calls.size()) / rate;
        while (due <= now && due < end) {
          start(due);
          due = t0 + static_cast<double>(calls.size()) / rate;
        }
        wake = due < end ? due : end;
      } else {
        while (in_flight < concurrency) start(now_s());
      }
    } else if (in_flight == 0) {
      break;
    } else {
      wake = now + 60.0;  // only answers are left to wait for; each has its deadline
    }
    void* tag = nullptr;
    bool ok = false;
    if (queue.AsyncNext(&tag, &ok, at(wake)) == grpc::CompletionQueue::GOT_EVENT) {
      static_cast<Call*>(tag)->done = now_s();
      --in_flight;
    }
  }
  std::printf("%.6f %.6f\n", t0, end);
  write_results(argv[8], calls);
  queue.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (queue.Next(&tag, &ok)) {
  }
  return 0;
}
