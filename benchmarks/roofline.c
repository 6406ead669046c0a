/* What this machine can do at best with benchmark (a)'s arrays: hand-written
   C on all cores (OpenMP), 64 variables of 262,144 float32, Adam's slots.

       gcc -O3 -march=native -ffast-math -fopenmp benchmarks/roofline.c -o roofline -lm
       ./roofline

   Prints the best of 30 runs, in ms, of:
   - Adam's update as one loop per variable (each array read or written once);
   - the same as three loops per variable (m, then v, then w, as XLA runs
     Keras's Adam);
   - the gradients' sum of squares;
   - that sum, then the one-loop update, last variable first: the least a
     step that skips non-finite gradients does (every gradient is read before
     the first weight is written);
   - the same with each weight's sum of squares taken right before its
     update: the least adaptive gradient clipping (AGC) does;
   - both again with the three-loop update, against the three loops.
   Not part of the test run. */

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#define VARS 64
#define SIZE 262144L
#define RUNS 30

static const float B1 = 0.9f, B2 = 0.999f, LR = 1e-3f, EPS = 1e-7f;

static void adam_one_loop(const float *restrict g, float *restrict m,
                          float *restrict v, float *restrict w, float scale) {
#pragma omp parallel for schedule(static)
  for (long i = 0; i < SIZE; i++) {
    float gi = g[i] * scale;
    float mi = m[i] + (gi - m[i]) * (1 - B1);
    float vi = v[i] + (gi * gi - v[i]) * (1 - B2);
    m[i] = mi;
    v[i] = vi;
    w[i] -= LR * mi / (sqrtf(vi) + EPS);
  }
}

static float sum_of_squares(const float *restrict g) {
  float s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
  for (long i = 0; i < SIZE; i++) s += g[i] * g[i];
  return s;
}

static void adam_three_loops(const float *restrict g, float *restrict m,
                             float *restrict v, float *restrict w, float scale) {
#pragma omp parallel for schedule(static)
  for (long i = 0; i < SIZE; i++) m[i] += (g[i] * scale - m[i]) * (1 - B1);
#pragma omp parallel for schedule(static)
  for (long i = 0; i < SIZE; i++) {
    float gi = g[i] * scale;
    v[i] += (gi * gi - v[i]) * (1 - B2);
  }
#pragma omp parallel for schedule(static)
  for (long i = 0; i < SIZE; i++) w[i] -= LR * m[i] / (sqrtf(v[i]) + EPS);
}

/* The sum of squares, then every variable's update, last first; with
   `weight_norms`, each scaled by AGC's factor from its weight's norm. */
static double floor_step(float *g, float *m, float *v, float *w, int three,
                         int weight_norms) {
  double t = omp_get_wtime();
  float s = 0, squares[VARS];
  for (int k = 0; k < VARS; k++) s += squares[k] = sum_of_squares(g + k * SIZE);
  float scale = isfinite(s) ? 1.0f : 0.0f;
  for (int k = VARS - 1; k >= 0; k--) {
    float f = scale;
    if (weight_norms) {
      float gn = sqrtf(squares[k]);
      float bound = 0.01f * fmaxf(sqrtf(sum_of_squares(w + k * SIZE)), 1e-3f);
      f = gn > bound ? scale * bound / gn : scale;
    }
    if (three)
      adam_three_loops(g + k * SIZE, m + k * SIZE, v + k * SIZE, w + k * SIZE, f);
    else
      adam_one_loop(g + k * SIZE, m + k * SIZE, v + k * SIZE, w + k * SIZE, f);
  }
  return omp_get_wtime() - t + 0 * s;
}

static float *array(float value, int wave) {
  float *a = aligned_alloc(64, VARS * SIZE * sizeof(float));
  for (long i = 0; i < VARS * SIZE; i++) a[i] = wave ? value * sinf(i) : value;
  return a;
}

int main(void) {
  float *g = array(1.0f, 1), *m = array(0.0f, 0), *v = array(0.0f, 0);
  float *w = array(0.01f, 1);
  double best[7] = {1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9};
  volatile float sink = 0;
  for (int run = 0; run < RUNS; run++) {
    double t = omp_get_wtime();
    for (int k = 0; k < VARS; k++)
      adam_one_loop(g + k * SIZE, m + k * SIZE, v + k * SIZE, w + k * SIZE, 1.0f);
    best[0] = fmin(best[0], omp_get_wtime() - t);

    t = omp_get_wtime();
    for (int k = 0; k < VARS; k++)
      adam_three_loops(g + k * SIZE, m + k * SIZE, v + k * SIZE, w + k * SIZE, 1.0f);
    best[1] = fmin(best[1], omp_get_wtime() - t);

    t = omp_get_wtime();
    float s = 0;
    for (int k = 0; k < VARS; k++) s += sum_of_squares(g + k * SIZE);
    best[2] = fmin(best[2], omp_get_wtime() - t);
    sink = s;

    best[3] = fmin(best[3], floor_step(g, m, v, w, 0, 0));
    best[4] = fmin(best[4], floor_step(g, m, v, w, 0, 1));
    best[5] = fmin(best[5], floor_step(g, m, v, w, 1, 0));
    best[6] = fmin(best[6], floor_step(g, m, v, w, 1, 1));
  }
  printf("Adam, one loop per variable:        %6.2f ms\n", best[0] * 1e3);
  printf("Adam, three loops per variable:     %6.2f ms\n", best[1] * 1e3);
  printf("the gradients' sum of squares:      %6.2f ms\n", best[2] * 1e3);
  printf("the sum, then the one-loop update:  %6.2f ms (%.2f of the one loop)\n",
         best[3] * 1e3, best[3] / best[0]);
  printf("... and each weight's norm (AGC):   %6.2f ms (%.2f of the one loop)\n",
         best[4] * 1e3, best[4] / best[0]);
  printf("the sum, then the three loops:      %6.2f ms (%.2f of the three loops)\n",
         best[5] * 1e3, best[5] / best[1]);
  printf("... and each weight's norm (AGC):   %6.2f ms (%.2f of the three loops)\n",
         best[6] * 1e3, best[6] / best[1]);
  (void)sink;
  return 0;
}
